"""What a caller asks of one generation; validated at the door so bad input never reaches
the batch."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from nanoflow.errors import RequestError


@dataclass(frozen=True)
class StructuredOutput:
    """A constraint on the output's text, enforced token by token (``engine/grammar.py``)."""

    kind: Literal["json", "json_schema", "regex", "grammar"]
    spec: str = ""  # the JSON schema (as JSON text), the regex or the EBNF grammar

    def __post_init__(self) -> None:
        if self.kind not in ("json", "json_schema", "regex", "grammar"):
            raise RequestError(f"unknown structured output kind {self.kind!r}")


@dataclass
class SamplingParams:
    """Sampling and stopping rules of one request (the fields OpenAI-style clients send)."""

    n: int = 1
    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: int | None = None  # how many top alternatives to report beside each sampled token
    # the same for each prompt token after the first (vLLM's name; what echo with logprobs shows)
    prompt_logprobs: int | None = None
    min_tokens: int = 0  # EOS and stop tokens are masked, and stop strings ignored, until then
    logit_bias: dict[int, float] = field(default_factory=dict)
    presence_penalty: float = 0.0  # subtracted once from every token already generated
    frequency_penalty: float = 0.0  # subtracted per occurrence in the generated text
    repetition_penalty: float = 1.0  # divides positive logits of prompt or output tokens
    structured: StructuredOutput | None = None  # needs a grammar attached to the sequence

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.validate()

    def validate(self) -> None:
        if not isinstance(self.max_tokens, int) or self.max_tokens <= 0:
            raise RequestError(f"max_tokens must be a positive integer, got {self.max_tokens!r}")
        if self.n < 1:
            raise RequestError(f"n must be at least 1, got {self.n}")
        if not 0.0 <= self.temperature <= 100.0:
            raise RequestError(f"temperature must be in [0, 100], got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise RequestError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise RequestError(f"top_k must be 0 (off) or positive, got {self.top_k}")
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None and not 0 <= value <= 20:
                raise RequestError(f"{name} must be between 0 and 20, got {value}")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise RequestError("stop must be a list of non-empty strings")
        if self.min_tokens < 0 or self.min_tokens > self.max_tokens:
            raise RequestError(f"min_tokens must be in [0, max_tokens], got {self.min_tokens}")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2.0 <= getattr(self, name) <= 2.0:
                raise RequestError(f"{name} must be in [-2, 2], got {getattr(self, name)}")
        if not 0.0 < self.repetition_penalty <= 10.0:
            raise RequestError(
                f"repetition_penalty must be in (0, 10], got {self.repetition_penalty}"
            )
        if any(not -100.0 <= b <= 100.0 for b in self.logit_bias.values()):
            raise RequestError("logit_bias values must be in [-100, 100]")

    def check_token_ids(self, vocab_size: int) -> None:
        """Token ids the request names (bias, stop tokens) must exist in the vocabulary."""
        for name, ids in (("logit_bias", self.logit_bias), ("stop_token_ids", self.stop_token_ids)):
            bad = [t for t in ids if not 0 <= t < vocab_size]
            if bad:
                raise RequestError(f"{name} names token {bad[0]}, outside [0, {vocab_size})")

    @property
    def has_penalties(self) -> bool:
        return (
            self.presence_penalty != 0.0
            or self.frequency_penalty != 0.0
            or self.repetition_penalty != 1.0
        )

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0 or self.top_k == 1
