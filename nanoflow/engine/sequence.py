"""One request's state as it moves through the engine: tokens, cache blocks, progress, timings."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import Any

from nanoflow.engine.sampling_params import SamplingParams

PLACEHOLDER = -1  # an output token sampled on the GPU whose value the host has not read yet
# a prompt token's log-probability and its most likely alternatives as (token id, logprob)
PromptLogprob = tuple[float, list[tuple[int, float]]]


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    """A request's tokens and progress. ``num_computed_tokens`` counts tokens whose K/V are in the
    cache; after a preemption it drops to 0 and prompt + outputs are recomputed.

    Equality is identity: the scheduler finds a request in its queues by object, and comparing
    every field (token lists included) made each lookup cost a pass over all of them."""

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    arrival_time: float = field(default_factory=time.perf_counter)
    output_token_ids: list[int] = field(default_factory=list)
    output_logprobs: list[float] = field(default_factory=list)
    status: SequenceStatus = SequenceStatus.WAITING
    num_computed_tokens: int = 0
    block_table: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    stop_text_len: int | None = None
    first_token_time: float | None = None
    finish_time: float | None = None
    num_preemptions: int = 0
    num_cached_tokens: int = 0  # prompt tokens whose K/V came from the prefix cache
    prompt_block_keys: list[tuple] | None = None  # prefix-cache keys of its full prompt blocks
    finishing: bool = False  # its last token is in flight; schedule it no more
    sampler_state: Any = None  # the sampler's per-request state (penalty counts, grammar)
    # per prompt position, filled as the prompt is computed when params.prompt_logprobs is set
    # (the first token has none: nothing comes before it)
    prompt_logprobs: list[PromptLogprob | None] | None = None

    def __post_init__(self) -> None:
        if self.params.prompt_logprobs is not None:
            self.prompt_logprobs = [None] * len(self.prompt_token_ids)
            # no prefix-cache keys: a prompt block served from the cache would have no logits
            self.prompt_block_keys = []

    @property
    def scored_prompt_len(self) -> int:
        """Prompt tokens whose logprobs are asked for: all of them, or none."""
        return 0 if self.prompt_logprobs is None else len(self.prompt_token_ids)

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    def token_slice(self, start: int, end: int) -> list[int]:
        """Tokens ``start:end`` of prompt + output, without building the whole list."""
        n = len(self.prompt_token_ids)
        if start >= n:
            return self.output_token_ids[start - n : end - n]
        if end <= n:
            return self.prompt_token_ids[start:end]
        return self.prompt_token_ids[start:] + self.output_token_ids[: end - n]

    def token_at(self, position: int) -> int:
        """Token ``position`` of prompt + output (a decode's input), without slicing."""
        prompt = self.prompt_token_ids
        if position < len(prompt):
            return prompt[position]
        return self.output_token_ids[position - len(prompt)]

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def num_pending_tokens(self) -> int:
        """Tokens whose K/V still have to be computed before the next sample."""
        return self.num_tokens - self.num_computed_tokens

    @property
    def num_resolved_outputs(self) -> int:
        """Output tokens whose values the host knows (placeholders sit only at the end)."""
        n = len(self.output_token_ids)
        while n and self.output_token_ids[n - 1] == PLACEHOLDER:
            n -= 1
        return n

    @property
    def is_decoding(self) -> bool:
        return self.num_pending_tokens == 1 and bool(self.output_token_ids)

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    def finish(self, reason: str) -> None:
        self.status = SequenceStatus.FINISHED
        self.finish_reason = reason
        self.finish_time = time.perf_counter()
