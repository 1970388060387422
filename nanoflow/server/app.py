"""The HTTP front end: routes, errors in OpenAI's shape, and the OpenAPI schema they follow.

The request guard (``guard.py``) runs in front of the routes. The engine process is started in
the app's lifespan, so uvicorn accepts connections only once the model is loaded (the port itself
is bound before, see ``http_server.py``), and stops it on the way out.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.exceptions import HTTPException as StarletteHTTPException

from nanoflow.config import EngineConfig
from nanoflow.server.engine_client import EngineClient, EngineDeadError
from nanoflow.server.engine_process import PromptFaults
from nanoflow.server.errors import APIError, engine_dead
from nanoflow.server.guard import DEFAULT_MAX_REQUEST_BYTES, RequestGuard
from nanoflow.server.metrics import ServerMetrics
from nanoflow.server.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    ErrorResponse,
    ModelCard,
    ModelList,
)
from nanoflow.server.replicas import ReplicaPool
from nanoflow.server.serving import OpenAIServing

logger = logging.getLogger(__name__)

_ERRORS: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorResponse} for status in (400, 401, 404, 413, 500, 503)
}
_TYPE_TAGS = {"str", "int", "float", "bool", "list", "dict", "none"}
# a completion is one JSON body, or server-sent events when it streams
_GENERATION = {
    **_ERRORS,
    200: {"content": {"application/json": {}, "text/event-stream": {}}},
}
_METRICS = {**_ERRORS, 200: {"content": {"text/plain": {}}}}


def openapi_without_422(app: FastAPI) -> dict[str, Any]:
    """The OpenAPI schema as the server behaves: a body that fails validation gets a 400 in
    OpenAI's shape, never FastAPI's default 422."""
    if app.openapi_schema is None:
        from fastapi.openapi.utils import get_openapi

        schema = get_openapi(title=app.title, version=app.version, routes=app.routes)
        for path in schema.get("paths", {}).values():
            for operation in path.values():
                operation.get("responses", {}).pop("422", None)
        for name in ("HTTPValidationError", "ValidationError"):
            schema.get("components", {}).get("schemas", {}).pop(name, None)
        app.openapi_schema = schema
    return app.openapi_schema


def load_front_end_tokenizer(config: EngineConfig) -> Any:
    """The model's tokenizer or None; raises ConfigError for an unknown model, before the
    server binds its port."""
    from nanoflow.engine.tokenizer import load_tokenizer
    from nanoflow.models.loader import resolve_model

    _, checkpoint = resolve_model(config.model)
    return load_tokenizer(config.tokenizer or checkpoint)


def _error(exc: APIError) -> JSONResponse:
    return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)


def field_path(loc: tuple) -> str | None:
    """``messages.0.content`` from a pydantic location, without the union members' type tags
    (``str``, ``list[int]``, model names) that pydantic puts between field names, nor a tagged
    union's tag (``response_format.json_schema.json_schema`` names one field)."""
    parts: list[str] = []
    for part in loc[1:]:
        keep = isinstance(part, int) or (
            re.fullmatch(r"[a-z_][a-z0-9_]*", part) and part not in _TYPE_TAGS
        )
        if keep and (not parts or parts[-1] != str(part)):
            parts.append(str(part))
    return ".".join(parts) or None


def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
    first = exc.errors()[0] if exc.errors() else {"msg": "invalid request", "loc": ()}
    if first.get("type") == "json_invalid":
        where = first["loc"][-1] if first.get("loc") else "?"
        reason = first.get("ctx", {}).get("error", first.get("msg"))
        return _error(APIError(400, f"the body is not valid JSON: {reason} at character {where}"))
    param = field_path(tuple(first.get("loc", ())))
    return _error(APIError(400, f"{param or 'body'}: {first.get('msg')}", param=param))


def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
    return _error(
        APIError(exc.status_code, str(exc.detail), code=str(exc.status_code), headers=exc.headers)
    )


def _unexpected_error(_: Request, exc: Exception) -> JSONResponse:
    logger.exception("unexpected error", exc_info=exc)
    return _error(APIError(500, f"internal error: {type(exc).__name__}", "server_error"))


def create_app(
    config: EngineConfig,
    model_name: str,
    api_key: str | None = None,
    log_level: int = logging.WARNING,
    tokenizer: Any = None,
    data_parallel_size: int = 1,
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
    engine_restarts: int = 0,
    faults: PromptFaults | None = None,
) -> FastAPI:
    """An app that serves ``config.model`` as ``model_name``; its engine (or its
    ``data_parallel_size`` replicas) starts with the app. ``app.state.draining`` set to True
    makes new /v1 requests get 503 (graceful shutdown). ``faults`` goes to the engine's
    ``on_token`` hook (fault injection, one engine only)."""
    client: EngineClient | ReplicaPool = (
        EngineClient(config, log_level, engine_restarts, faults)
        if data_parallel_size == 1
        else ReplicaPool(config, data_parallel_size, log_level, engine_restarts)
    )
    metrics = ServerMetrics(model_name)
    client.iteration_listeners.append(metrics.observe_iteration)
    created = int(time.time())

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await client.start()
        app.state.serving = OpenAIServing(client, tokenizer, model_name, metrics)
        try:
            yield
        finally:
            await client.shutdown()

    app = FastAPI(title="nanoflow", version="0.1.0", lifespan=lifespan)
    app.state.client = client
    app.state.draining = False
    app.add_middleware(
        RequestGuard,
        api_key=api_key,
        max_request_bytes=max_request_bytes,
        draining=lambda: app.state.draining,
    )
    app.add_exception_handler(APIError, lambda _, exc: _error(exc))
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(Exception, _unexpected_error)

    def serving() -> OpenAIServing:
        return app.state.serving

    @app.get("/health", responses=_ERRORS)
    async def health() -> dict[str, str]:
        problem = client.health()
        if problem is not None:
            raise APIError(503, problem, "service_unavailable")
        if app.state.draining:
            raise APIError(503, "the server is shutting down", "service_unavailable")
        return {"status": "ok"}

    @app.get("/metrics", response_class=PlainTextResponse, responses=_METRICS)
    async def prometheus() -> Response:
        try:
            stats = await client.stats()
        except (EngineDeadError, TimeoutError) as exc:
            raise engine_dead(str(exc)) from None
        return Response(metrics.render(stats), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models", responses=_ERRORS)
    async def models() -> ModelList:
        info = client.info
        card = ModelCard(
            id=model_name,
            created=created,
            max_model_len=info.max_model_len,
            vocab_size=info.vocab_size,
        )
        return ModelList(data=[card])

    @app.post(
        "/v1/completions",
        response_model=None,
        responses=_GENERATION,
    )
    async def completions(req: CompletionRequest, raw: Request) -> Response:
        return await serving().completions(req, raw)

    @app.post(
        "/v1/chat/completions",
        response_model=None,
        responses=_GENERATION,
    )
    async def chat(req: ChatCompletionRequest, raw: Request) -> Response:
        return await serving().chat(req, raw)

    app.openapi = lambda: openapi_without_422(app)
    return app
