"""Response bodies in OpenAI's shapes, for /v1/completions and /v1/chat/completions.

``top_logprobs`` lists the k most likely tokens the engine reported at each step (k = the
request's ``logprobs`` / ``top_logprobs``); the completions shape also keeps the sampled token,
as OpenAI's does, so it may hold k + 1 entries. A completion that echoes its prompt with logprobs
lists the prompt's tokens first, the first of them with a null logprob (nothing precedes it), and
its ``text_offset`` counts characters of the returned text, echo included.
"""

from __future__ import annotations

import math
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from nanoflow.engine.sequence import PromptLogprob
from nanoflow.server.streaming import ChoiceState, Delta

TokenText = Callable[[int], str]
Top = list[list[tuple[int, float]]]
# JSON has no infinities: a token the sampler ruled out (a constraint, top-p) gets this instead,
# as vLLM reports it
LOWEST_LOGPROB = -9999.0


def finite(logprob: float) -> float:
    return logprob if math.isfinite(logprob) else LOWEST_LOGPROB


def _offsets(tokens: list[str], start: int) -> list[int]:
    """Where each token's text starts, in characters, the first starting at ``start``."""
    out = []
    for tok in tokens:
        out.append(start)
        start += len(tok)
    return out


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
    prompt_ids: list[list[int]] | None = None  # per choice, its tokens, if their logprobs show

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
            "text_offset": _offsets(tokens, offset),
        }

    def _prefix(self, index: int) -> str:
        return self.prefixes[index] if self.prefixes else ""

    def _echoed(self, index: int, scores: list[PromptLogprob | None]) -> dict[str, list]:
        """The legacy logprobs object of choice ``index``'s prompt tokens."""
        tokens = [self.token_text(t) for t in self.prompt_ids[index]]
        tops: list[dict | None] = []
        for tok, score in zip(tokens, scores, strict=True):
            if score is None:
                tops.append(None)
            else:
                alternatives = {self.token_text(t): finite(v) for t, v in score[1]}
                tops.append({**alternatives, tok: finite(score[0])})
        return {
            "tokens": tokens,
            "token_logprobs": [None if score is None else finite(score[0]) for score in scores],
            "top_logprobs": tops,
            "text_offset": _offsets(tokens, 0),
        }

    def _choice_logprobs(
        self,
        index: int,
        token_ids: list[int],
        logprobs: list[float],
        offset: int,
        top: Top,
        scores: list[PromptLogprob | None] | None,
    ) -> dict | None:
        """The generated tokens' logprobs, offset past the echoed prompt, after the prompt's
        own when they are asked for and ``scores`` (given with the first tokens) holds them."""
        generated = self._logprobs(token_ids, logprobs, offset + len(self._prefix(index)), top)
        if generated is None or self.prompt_ids is None or scores is None:
            return generated
        echoed = self._echoed(index, scores)
        return {key: echoed[key] + generated[key] for key in generated}

    def chunk(self, index: int, delta: Delta, first: bool) -> dict[str, Any]:
        choice = {
            "index": index,
            "text": (self._prefix(index) if first else "") + delta.text,
            "logprobs": self._choice_logprobs(
                index,
                delta.token_ids,
                delta.logprobs,
                delta.text_offset,
                delta.top_logprobs,
                delta.prompt_logprobs if first else None,
            ),
            "finish_reason": delta.finish_reason,
        }
        return self._envelope([choice], chunk=True)

    def response(self, states: list[ChoiceState], usage_: dict) -> dict[str, Any]:
        choices = [
            {
                "index": i,
                "text": self._prefix(i) + s.emitted,
                "logprobs": self._choice_logprobs(
                    i, s.token_ids, s.logprobs, 0, s.top_logprobs, s.prompt_logprobs
                ),
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
