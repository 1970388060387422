"""Running the app under uvicorn: the port bound before the model loads, one line when ready, a
draining shutdown, and a non-zero exit when the engine is gone for good."""

from __future__ import annotations

import asyncio
import logging
import socket
from types import FrameType

import uvicorn
from fastapi import FastAPI

from nanoflow.config import EngineConfig
from nanoflow.errors import ConfigError
from nanoflow.server.app import create_app, load_front_end_tokenizer
from nanoflow.server.engine_process import PromptFaults
from nanoflow.server.guard import DEFAULT_MAX_REQUEST_BYTES

logger = logging.getLogger(__name__)


class GracefulServer(uvicorn.Server):
    """On SIGINT/SIGTERM new /v1 requests get 503 while running ones get ``grace`` seconds to
    finish; what is still running then is cut (its stream ends with an error event), and the
    app's lifespan stops the engine process. ``exit_code`` is 1 when the engine died for good."""

    def __init__(self, config: uvicorn.Config, app: FastAPI, grace: float, ready: str) -> None:
        super().__init__(config)
        self.app, self.grace, self.ready = app, grace, ready
        self.client = app.state.client
        self.exit_code = 0
        self.client.on_fatal = self._engine_gone

    def _engine_gone(self, reason: str) -> None:
        logger.error("the engine is gone (%s) and will not be restarted; exiting", reason)
        self.exit_code = 1
        self.should_exit = True

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        info = self.client.info
        if self.started and info is not None:
            logger.info(
                "ready: %s (executor %s, %d KV blocks)", self.ready, info.executor, info.num_blocks
            )

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if not self.app.state.draining and self.client.info is not None:
            self.app.state.draining = True
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                loop = None
            if loop is not None:
                loop.call_soon_threadsafe(loop.call_later, self.grace, self.client.abort_all)
        super().handle_exit(sig, frame)


def bind(host: str, port: int) -> socket.socket:
    """The listening socket, bound now so a busy port is reported before the model loads."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise ConfigError(f"cannot listen on {host}:{port}: {exc.strerror}") from None
    sock.set_inheritable(True)
    return sock


def serve(
    config: EngineConfig,
    model_name: str,
    host: str = "127.0.0.1",
    port: int = 8000,
    api_key: str | None = None,
    verbose: bool = False,
    shutdown_timeout: float = 5.0,
    data_parallel_size: int = 1,
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
    engine_restarts: int = 0,
    faults: PromptFaults | None = None,
) -> int:
    """Serve until a signal arrives; the exit status (1 if the server never started or its
    engine died with no restarts left)."""
    sock = bind(host, port)
    logging.getLogger(__name__).setLevel(logging.INFO)
    log_level = logging.INFO if verbose else logging.WARNING
    tokenizer = load_front_end_tokenizer(config)
    app = create_app(
        config,
        model_name,
        api_key,
        log_level,
        tokenizer,
        data_parallel_size,
        max_request_bytes,
        engine_restarts,
        faults,
    )
    uv_config = uvicorn.Config(
        app,
        log_level="info" if verbose else "warning",
        timeout_graceful_shutdown=shutdown_timeout + 2.0,
    )
    ready = f"serving {model_name!r} on http://{host}:{port}"
    server = GracefulServer(uv_config, app, shutdown_timeout, ready)
    server.run(sockets=[sock])
    return server.exit_code if server.started else 1
