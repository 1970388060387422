"""Response bodies in OpenAI's shapes, for /v1/completions and /v1/chat/completions.

``top_logprobs`` lists the k most likely tokens the engine reported at each step (k = the
request's ``logprobs`` / ``top_logprobs``); the completions shape also keeps the sampled token,
as OpenAI's does, so it may hold k + 1 entries.
"""

from __future__ import annotations

import math
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from nanoflow.server.streaming import ChoiceState, Delta

TokenText = Callable[[int], str]
Top = list[list[tuple[int, float]]]
# JSON has no infinities: a token the sampler ruled out (a constraint, top-p) gets this instead,
# as vLLM reports it
LOWEST_LOGPROB = -9999.0


def finite(logprob: float) -> float:
    return logprob if math.isfinite(logprob) else LOWEST_LOGPROB


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> dict[str, Any]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": cached_tokens},
    }


@dataclass
class CompletionFormat:
    """/v1/completions: ``choices[i].text`` and the legacy logprobs object."""

    model: str
    token_text: TokenText
    logprobs: bool
    object_name: str = "text_completion"
    prefixes: list[str] | None = None  # per choice, the echoed prompt

    def __post_init__(self) -> None:
        self.id = f"cmpl-{uuid.uuid4().hex}"
        self.created = int(time.time())

    def _envelope(self, choices: list[dict], chunk: bool) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": self.object_name,
            "created": self.created,
            "model": self.model,
            "choices": choices,
        }

    def _logprobs(
        self, token_ids: list[int], logprobs: list[float], offset: int, top: Top
    ) -> dict | None:
        if not self.logprobs:
            return None
        tokens = [self.token_text(t) for t in token_ids]
        offsets = []
        for tok in tokens:
            offsets.append(offset)
            offset += len(tok)
        tops = []
        for i, (tok, lp) in enumerate(zip(tokens, logprobs, strict=False)):
            alternatives = (
                {self.token_text(t): finite(v) for t, v in top[i]} if i < len(top) else {}
            )
            tops.append({**alternatives, tok: finite(lp)})
        return {
            "tokens": tokens,
            "token_logprobs": [finite(lp) for lp in logprobs],
            "top_logprobs": tops,
            "text_offset": offsets,
        }

    def _prefix(self, index: int) -> str:
        return self.prefixes[index] if self.prefixes else ""

    def chunk(self, index: int, delta: Delta, first: bool) -> dict[str, Any]:
        choice = {
            "index": index,
            "text": (self._prefix(index) if first else "") + delta.text,
            "logprobs": self._logprobs(
                delta.token_ids, delta.logprobs, delta.text_offset, delta.top_logprobs
            ),
            "finish_reason": delta.finish_reason,
        }
        return self._envelope([choice], chunk=True)

    def response(self, states: list[ChoiceState], usage_: dict) -> dict[str, Any]:
        choices = [
            {
                "index": i,
                "text": self._prefix(i) + s.emitted,
                "logprobs": self._logprobs(s.token_ids, s.logprobs, 0, s.top_logprobs),
                "finish_reason": s.finish_reason,
            }
            for i, s in enumerate(states)
        ]
        return {**self._envelope(choices, chunk=False), "usage": usage_}

    def usage_chunk(self, usage_: dict) -> dict[str, Any]:
        return {**self._envelope([], chunk=True), "usage": usage_}


@dataclass
class ChatFormat(CompletionFormat):
    """/v1/chat/completions: an assistant message (``delta`` when streaming) per choice."""

    object_name: str = "chat.completion"

    def __post_init__(self) -> None:
        super().__post_init__()
        self.id = f"chatcmpl-{uuid.uuid4().hex}"

    def _envelope(self, choices: list[dict], chunk: bool) -> dict[str, Any]:
        body = super()._envelope(choices, chunk)
        body["object"] = "chat.completion.chunk" if chunk else "chat.completion"
        return body

    def _entry(self, token_id: int, logprob: float) -> dict[str, Any]:
        tok = self.token_text(token_id)
        return {"token": tok, "logprob": finite(logprob), "bytes": list(tok.encode())}

    def _logprobs(
        self, token_ids: list[int], logprobs: list[float], offset: int, top: Top
    ) -> dict | None:
        if not self.logprobs:
            return None
        content = []
        for i, (token_id, lp) in enumerate(zip(token_ids, logprobs, strict=False)):
            alternatives = [self._entry(t, v) for t, v in top[i]] if i < len(top) else []
            content.append({**self._entry(token_id, lp), "top_logprobs": alternatives})
        return {"content": content}

    def chunk(self, index: int, delta: Delta, first: bool) -> dict[str, Any]:
        message: dict[str, Any] = {"content": delta.text}
        if first:
            message["role"] = "assistant"
        choice = {
            "index": index,
            "delta": message,
            "logprobs": self._logprobs(
                delta.token_ids, delta.logprobs, delta.text_offset, delta.top_logprobs
            ),
            "finish_reason": delta.finish_reason,
        }
        return self._envelope([choice], chunk=True)

    def response(self, states: list[ChoiceState], usage_: dict) -> dict[str, Any]:
        choices = [
            {
                "index": i,
                "message": {"role": "assistant", "content": s.emitted},
                "logprobs": self._logprobs(s.token_ids, s.logprobs, 0, s.top_logprobs),
                "finish_reason": s.finish_reason,
            }
            for i, s in enumerate(states)
        ]
        return {**self._envelope(choices, chunk=False), "usage": usage_}
