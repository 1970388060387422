"""Token ids to text, one choice at a time, without ever showing text past a stop string.

The engine finds stop strings on the full decoded output and reports where the first one starts
(``stop_text_len``). While a request runs, any tail of the text that could still grow into a stop
string is held back, so a stream never emits characters that the final answer trims away.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

from nanoflow.engine.engine_core import RequestOutput
from nanoflow.engine.sequence import PromptLogprob

Decode = Callable[[list[int]], str]
_REPLACEMENT = "\ufffd"


@dataclass
class Delta:
    """What one engine output adds to a choice: new text (maybe empty), tokens and logprobs."""

    text: str
    token_ids: list[int]
    logprobs: list[float]
    text_offset: int
    finish_reason: str | None = None
    top_logprobs: list[list[tuple[int, float]]] = field(default_factory=list)
    prompt_logprobs: list[PromptLogprob | None] | None = None  # with the first token, if asked


class IncrementalDecoder:
    """Decodes a growing token list; only the last few tokens are decoded per step, and text
    that ends in a partial UTF-8 character waits for the next token."""

    def __init__(self, decode: Decode | None) -> None:
        self.decode = decode
        self.token_ids: list[int] = []
        self.text = ""
        self._prefix = 0
        self._read = 0

    def add(self, token_ids: list[int]) -> None:
        self.token_ids += token_ids
        if self.decode is None:
            return
        prefix_text = self.decode(self.token_ids[self._prefix : self._read])
        new_text = self.decode(self.token_ids[self._prefix :])
        if len(new_text) > len(prefix_text) and not new_text.endswith(_REPLACEMENT):
            self.text += new_text[len(prefix_text) :]
            self._prefix, self._read = self._read, len(self.token_ids)

    def final_text(self, stop_text_len: int | None) -> str:
        """The whole output decoded at once, as the engine saw it when it matched the stop."""
        if self.decode is None:
            return ""
        text = self.decode(self.token_ids)
        return text[:stop_text_len] if stop_text_len is not None else text


def held_back(text: str, stops: list[str]) -> int:
    """Length of the longest tail of ``text`` that is a proper prefix of some stop string."""
    best = 0
    for stop in stops:
        for k in range(min(len(stop) - 1, len(text)), best, -1):
            if text.endswith(stop[:k]):
                best = k
                break
    return best


def openai_finish_reason(reason: str | None) -> str:
    """OpenAI's clients know 'stop' and 'length' (and tool calls, which this server has not): an
    engine-side end such as an abort reads as 'stop'; its cause travels as an error event."""
    return reason if reason in ("stop", "length") else "stop"


@dataclass
class ChoiceState:
    """One choice's progress: every token and logprob so far, and how much text went out."""

    decode: Decode | None
    stops: list[str]
    created: float = field(default_factory=time.perf_counter)
    emitted: str = ""
    logprobs: list[float] = field(default_factory=list)
    top_logprobs: list[list[tuple[int, float]]] = field(default_factory=list)
    finish_reason: str | None = None
    first_token_time: float | None = None
    last_token_time: float | None = None
    inter_token_seconds: list[float] = field(default_factory=list)
    cached_prompt_tokens: int = 0  # served from the prefix cache
    prompt_logprobs: list[PromptLogprob | None] | None = None  # per prompt position, if asked

    def __post_init__(self) -> None:
        self.decoder = IncrementalDecoder(self.decode)

    @property
    def token_ids(self) -> list[int]:
        return self.decoder.token_ids

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def update(self, out: RequestOutput) -> Delta:
        now = time.perf_counter()
        if out.new_token_ids:
            if self.first_token_time is None:
                self.first_token_time = now
            elif self.last_token_time is not None:
                self.inter_token_seconds.append(now - self.last_token_time)
            self.last_token_time = now
        self.decoder.add(out.new_token_ids)
        self.logprobs += out.new_logprobs
        self.top_logprobs += out.new_top_logprobs
        if out.prompt_logprobs is not None:
            self.prompt_logprobs = out.prompt_logprobs
        self.cached_prompt_tokens = int(out.metrics.get("num_cached_tokens", 0))
        offset = len(self.emitted)
        if out.finished:
            self.finish_reason = openai_finish_reason(out.finish_reason)
            text = self.decoder.final_text(out.stop_text_len)
            new = text[offset:] if text.startswith(self.emitted) else ""
        else:
            text = self.decoder.text
            new = text[offset : len(text) - held_back(text, self.stops)]
        self.emitted += new
        return Delta(
            new,
            out.new_token_ids,
            out.new_logprobs,
            offset,
            self.finish_reason,
            out.new_top_logprobs,
            out.prompt_logprobs,
        )

    @property
    def mean_logprob(self) -> float:
        """The ranking of best_of: log-probability per generated token."""
        return sum(self.logprobs) / max(1, len(self.logprobs))
