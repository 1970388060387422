"""From a validated OpenAI request to engine requests and back: tokenize, check against the
model's limits, fan out one engine request per prompt and choice, then answer as one JSON body or
as server-sent events.

The response status is decided by the first engine event: a request the engine fails before its
first token gets a real 500 (or 400 / 503) rather than a 200 stream that breaks later.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Awaitable
from dataclasses import replace
from typing import Any, TypeVar

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from nanoflow.engine.sampling_params import SamplingParams
from nanoflow.engine.tokenizer import decode
from nanoflow.errors import RequestError
from nanoflow.server.engine_client import EngineClient, EngineDeadError, Event, RequestStream
from nanoflow.server.errors import APIError, engine_dead
from nanoflow.server.formats import ChatFormat, CompletionFormat, usage
from nanoflow.server.metrics import ServerMetrics
from nanoflow.server.protocol import (
    MAX_CHOICES,
    MAX_SEED,
    ChatCompletionRequest,
    CompletionRequest,
    SamplingFields,
    refused_fields,
)
from nanoflow.server.replicas import ReplicaPool
from nanoflow.server.streaming import ChoiceState
from nanoflow.server.structured import structured_output
from nanoflow.server.tokenizing import FrontEndTokenizer

logger = logging.getLogger(__name__)
T = TypeVar("T")
_COMPLETION_DEFAULT_MAX_TOKENS = 16
_ignored_fields: set[str] = set()


def check_fields(req: SamplingFields) -> None:
    """Refuse the unsupported fields a request uses; log each other unknown field name once."""
    extra = req.model_extra or {}
    refused = refused_fields(extra)
    if refused:
        raise APIError(
            400, f"not supported by this server: {', '.join(refused)}", param=refused[0],
            code="unsupported_parameter",
        )  # fmt: skip
    for name in sorted(set(extra) - _ignored_fields):
        _ignored_fields.add(name)
        logger.warning("ignoring the unknown request field %r (logged once)", name)


def event_error(event: Event) -> APIError | None:
    if event.dead is not None:
        return engine_dead(event.dead)
    if event.rejected is not None:
        return APIError(400, event.rejected)
    if event.output.error is not None:
        return APIError(
            500, f"the engine failed this request: {event.output.error}", "server_error"
        )
    return None


class OpenAIServing:
    def __init__(
        self,
        client: EngineClient | ReplicaPool,
        tokenizer: Any,
        model_name: str,
        metrics: ServerMetrics,
    ) -> None:
        self.client, self.tokenizer, self.model_name = client, tokenizer, model_name
        self.metrics = metrics
        self.decode = (lambda ids: decode(tokenizer, ids)) if tokenizer is not None else None
        self.text = FrontEndTokenizer(tokenizer) if tokenizer is not None else None

    def token_text(self, token_id: int) -> str:
        return self.decode([token_id]) if self.decode else f"token_id:{token_id}"

    def check_model(self, name: str | None) -> None:
        if name is not None and name != self.model_name:
            raise APIError(
                404, f"model {name!r} does not exist; this server serves {self.model_name!r}",
                param="model", code="model_not_found",
            )  # fmt: skip

    async def _encode(self, text: str) -> list[int]:
        if self.text is None:
            raise APIError(400, "this model has no tokenizer: send token ids", param="prompt")
        return await self.text.encode(text, self.client.info.max_model_len, "prompt")

    def _check_prompt(self, ids: list[int], param: str) -> None:
        info = self.client.info
        if not ids:
            raise APIError(400, "the prompt is empty", param=param)
        if any(t >= info.vocab_size for t in ids):
            raise APIError(400, f"prompt token ids must be below {info.vocab_size}", param=param)
        if len(ids) >= info.max_model_len:
            raise APIError(
                400, f"the prompt has {len(ids)} tokens; the context is {info.max_model_len}",
                param=param, code="context_length_exceeded",
            )  # fmt: skip

    def _params(
        self, req: SamplingFields, prompt_len: int, max_tokens: int | None, logprobs: int | None
    ) -> SamplingParams:
        room = self.client.info.max_model_len - prompt_len
        if max_tokens is None:
            max_tokens = room if isinstance(req, ChatCompletionRequest) else min(room, 16)
        elif max_tokens > room:
            raise APIError(
                400, f"max_tokens ({max_tokens}) + prompt ({prompt_len} tokens) exceeds the "
                f"context of {self.client.info.max_model_len}", param="max_tokens",
                code="context_length_exceeded",
            )  # fmt: skip
        top_k = 0 if req.top_k in (None, -1) else min(req.top_k, self.client.info.vocab_size)
        try:
            return SamplingParams(
                max_tokens=max_tokens,
                temperature=1.0 if req.temperature is None else req.temperature,
                top_p=1.0 if req.top_p is None else req.top_p,
                top_k=top_k,
                seed=req.seed,
                stop=[req.stop] if isinstance(req.stop, str) else list(req.stop or []),
                ignore_eos=req.ignore_eos,
                stop_token_ids=list(req.stop_token_ids or []),
                logprobs=logprobs,
                min_tokens=req.min_tokens,
                logit_bias=self._logit_bias(req.logit_bias),
                presence_penalty=req.presence_penalty,
                frequency_penalty=req.frequency_penalty,
                repetition_penalty=req.repetition_penalty,
                structured=structured_output(req),
            )
        except RequestError as exc:  # its message starts with the field it is about
            field = str(exc).split(" ", 1)[0]
            param = field if field in type(req).model_fields else None
            raise APIError(400, str(exc), param=param) from None

    def _logit_bias(self, bias: dict[str, float] | None) -> dict[int, float]:
        """OpenAI's logit_bias keys are token ids written as strings."""
        vocab = self.client.info.vocab_size
        out = {}
        for key, value in (bias or {}).items():
            if not key.isdigit() or int(key) >= vocab:
                raise APIError(
                    400, f"logit_bias keys must be token ids below {vocab}, got {key!r}",
                    param="logit_bias",
                )  # fmt: skip
            out[int(key)] = value
        return out

    async def completions(self, req: CompletionRequest, raw: Request) -> Response:
        self.check_model(req.model)
        check_fields(req)
        prompts = req.prompt
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        encoded = [await self._encode(p) if isinstance(p, str) else list(p) for p in prompts]
        if not encoded:
            raise APIError(400, "the prompt is empty", param="prompt")
        for ids in encoded:
            self._check_prompt(ids, "prompt")
        fan_out = self._best_of(req)
        logprobs = 0 if req.logprobs is None and fan_out > req.n else req.logprobs
        params = [self._params(req, len(ids), req.max_tokens, logprobs) for ids in encoded]
        fmt = CompletionFormat(self.model_name, self.token_text, req.logprobs is not None)
        if req.echo:
            texts = [p if isinstance(p, str) else self.decode_prompt(p) for p in prompts]
            fmt.prefixes = [text for text in texts for _ in range(req.n)]
            if req.logprobs is not None:  # the prompt's tokens are scored by the engine
                params = [replace(p, prompt_logprobs=req.logprobs) for p in params]
                fmt.prompt_ids = [ids for ids in encoded for _ in range(req.n)]
        return await self._generate(req, fmt, encoded, params, raw, fan_out)

    def decode_prompt(self, ids: list[int]) -> str:
        return self.decode(ids) if self.decode else ""

    @staticmethod
    def _best_of(req: CompletionRequest) -> int:
        """Candidates generated per prompt; the n with the best logprob per token are returned."""
        if req.best_of is None:
            return req.n
        if req.best_of < req.n:
            raise APIError(
                400, f"best_of ({req.best_of}) must be at least n ({req.n})", param="best_of"
            )
        if req.stream and req.best_of > req.n:
            raise APIError(400, "best_of greater than n cannot be streamed", param="best_of")
        return req.best_of

    async def chat(self, req: ChatCompletionRequest, raw: Request) -> Response:
        self.check_model(req.model)
        check_fields(req)
        if self.text is None:
            raise APIError(
                400, "this model has no tokenizer, so no chat template", param="messages"
            )
        messages = [{"role": m.role, "content": m.text()} for m in req.messages]
        ids = await self.text.chat_prompt(messages, self.client.info.max_model_len)
        self._check_prompt(ids, "messages")
        max_tokens = req.max_completion_tokens or req.max_tokens
        if req.top_logprobs and not req.logprobs:
            raise APIError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
        logprobs = (req.top_logprobs or 0) if req.logprobs else None
        params = [self._params(req, len(ids), max_tokens, logprobs)]
        fmt = ChatFormat(self.model_name, self.token_text, req.logprobs)
        return await self._generate(req, fmt, [ids], params, raw)

    async def _generate(
        self,
        req: SamplingFields,
        fmt: CompletionFormat,
        prompts: list[list[int]],
        params: list[SamplingParams],
        raw: Request,
        fan_out: int | None = None,
    ) -> Response:
        fan_out = fan_out or req.n
        if len(prompts) * fan_out > MAX_CHOICES:
            raise APIError(400, f"prompts x n must be at most {MAX_CHOICES}", param="n")
        requests = [
            (ids, replace(p, n=1, seed=None if p.seed is None else (p.seed + k) % MAX_SEED))
            for ids, p in zip(prompts, params, strict=True)
            for k in range(fan_out)
        ]
        try:
            stream = self.client.submit(requests)
        except EngineDeadError as exc:
            raise engine_dead(str(exc)) from None
        for ids in prompts:
            self.metrics.observe_prompt(len(ids))
        states = [ChoiceState(self.decode, p.stop) for _, p in requests]
        prompt_tokens = sum(len(ids) for ids in prompts)
        events = aiter(stream)
        streaming = False
        try:
            first = await _unless_disconnected(anext(events), raw)
            if (error := event_error(first)) is not None:
                raise error
            if req.stream:
                body = self._sse(fmt, stream, events, first, states, prompt_tokens, req)
                streaming = True
                return StreamingResponse(body, media_type="text/event-stream")
            return await _unless_disconnected(
                self._collect(fmt, events, first, states, prompt_tokens, req.n, fan_out), raw
            )
        finally:
            if not streaming:
                self._finish(stream, states)

    def _finish(self, stream: RequestStream, states: list[ChoiceState]) -> None:
        """Abort what is unfinished and record the request's metrics, once."""
        if not stream.closed:
            stream.close()
            for state in states:
                self.metrics.observe_choice(state)

    async def _collect(
        self,
        fmt: CompletionFormat,
        events: AsyncIterator[Event],
        first: Event,
        states: list[ChoiceState],
        prompt_tokens: int,
        n: int,
        fan_out: int,
    ) -> Response:
        event: Event | None = first
        while event is not None:
            if (error := event_error(event)) is not None:
                raise error
            if event.cut is not None:
                raise APIError(503, f"the request was cut: {event.cut}", "service_unavailable")
            states[event.index].update(event.output)
            event = await anext(events, None)
        usage_ = _usage(states, prompt_tokens, fan_out)
        return JSONResponse(fmt.response(_best(states, n, fan_out), usage_))

    async def _sse(
        self,
        fmt: CompletionFormat,
        stream: RequestStream,
        events: AsyncIterator[Event],
        first: Event,
        states: list[ChoiceState],
        prompt_tokens: int,
        req: SamplingFields,
    ) -> AsyncIterator[str]:
        started = [False] * len(states)
        event: Event | None = first
        try:
            while event is not None:
                if (error := event_error(event)) is not None:
                    yield _sse_data(error.body())
                    break
                delta = states[event.index].update(event.output)
                yield _sse_data(fmt.chunk(event.index, delta, not started[event.index]))
                started[event.index] = True
                if event.cut is not None:
                    cut = APIError(503, f"the stream was cut: {event.cut}", "service_unavailable")
                    yield _sse_data(cut.body())
                event = await anext(events, None)
            else:
                if req.include_usage:
                    yield _sse_data(fmt.usage_chunk(_usage(states, prompt_tokens, req.n)))
            yield "data: [DONE]\n\n"
        finally:
            self._finish(stream, states)


def _best(states: list[ChoiceState], n: int, fan_out: int) -> list[ChoiceState]:
    """Per prompt (``fan_out`` states each, prompt-major), its ``n`` best by logprob per token."""
    if fan_out == n:
        return states
    groups = (states[i : i + fan_out] for i in range(0, len(states), fan_out))
    return [s for g in groups for s in sorted(g, key=lambda s: -s.mean_logprob)[:n]]


def _usage(states: list[ChoiceState], prompt_tokens: int, n: int) -> dict[str, Any]:
    """Usage of a request of ``n`` choices per prompt (states prompt-major): prompt tokens count
    once per prompt, and so do those served from the prefix cache (its first choice's)."""
    completion_tokens = sum(len(s.token_ids) for s in states)
    cached = sum(s.cached_prompt_tokens for s in states[::n])
    return usage(prompt_tokens, completion_tokens, cached)


def _sse_data(body: dict[str, Any]) -> str:
    return f"data: {json.dumps(body, separators=(',', ':'))}\n\n"


async def _unless_disconnected(work: Awaitable[T], raw: Request) -> T:
    """Await ``work`` but give up (cancelling it) if the client hangs up first."""
    task = asyncio.ensure_future(work)
    while True:
        done, _ = await asyncio.wait({task}, timeout=0.5)
        if done:
            return task.result()
        if await raw.is_disconnected():
            task.cancel()
            raise APIError(499, "the client closed the connection", code="client_closed")
