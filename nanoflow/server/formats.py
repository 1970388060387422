"""Response bodies in OpenAI's shapes, for /v1/completions and /v1/chat/completions.

The engine reports the log-probability of each sampled token only, so ``top_logprobs`` lists that
token alone (for greedy decoding it is the top-1 entry).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from nanoflow.server.streaming import ChoiceState, Delta

TokenText = Callable[[int], str]


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

    def _logprobs(self, token_ids: list[int], logprobs: list[float], offset: int) -> dict | None:
        if not self.logprobs:
            return None
        tokens = [self.token_text(t) for t in token_ids]
        offsets = []
        for tok in tokens:
            offsets.append(offset)
            offset += len(tok)
        return {
            "tokens": tokens,
            "token_logprobs": logprobs,
            "top_logprobs": [{tok: lp} for tok, lp in zip(tokens, logprobs, strict=False)],
            "text_offset": offsets,
        }

    def chunk(self, index: int, delta: Delta, first: bool) -> dict[str, Any]:
        choice = {
            "index": index,
            "text": delta.text,
            "logprobs": self._logprobs(delta.token_ids, delta.logprobs, delta.text_offset),
            "finish_reason": delta.finish_reason,
        }
        return self._envelope([choice], chunk=True)

    def response(self, states: list[ChoiceState], usage_: dict) -> dict[str, Any]:
        choices = [
            {
                "index": i,
                "text": s.emitted,
                "logprobs": self._logprobs(s.token_ids, s.logprobs, 0),
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

    def _logprobs(self, token_ids: list[int], logprobs: list[float], offset: int) -> dict | None:
        if not self.logprobs:
            return None
        content = []
        for token_id, lp in zip(token_ids, logprobs, strict=False):
            tok = self.token_text(token_id)
            entry = {"token": tok, "logprob": lp, "bytes": list(tok.encode())}
            content.append({**entry, "top_logprobs": [entry]})
        return {"content": content}

    def chunk(self, index: int, delta: Delta, first: bool) -> dict[str, Any]:
        message: dict[str, Any] = {"content": delta.text}
        if first:
            message["role"] = "assistant"
        choice = {
            "index": index,
            "delta": message,
            "logprobs": self._logprobs(delta.token_ids, delta.logprobs, delta.text_offset),
            "finish_reason": delta.finish_reason,
        }
        return self._envelope([choice], chunk=True)

    def response(self, states: list[ChoiceState], usage_: dict) -> dict[str, Any]:
        choices = [
            {
                "index": i,
                "message": {"role": "assistant", "content": s.emitted},
                "logprobs": self._logprobs(s.token_ids, s.logprobs, 0),
                "finish_reason": s.finish_reason,
            }
            for i, s in enumerate(states)
        ]
        return {**self._envelope(choices, chunk=False), "usage": usage_}
