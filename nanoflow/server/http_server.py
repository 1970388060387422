"""Running the app under uvicorn with a shutdown that does not wait on long streams."""

from __future__ import annotations

import asyncio
import logging
from types import FrameType

import uvicorn

from nanoflow.config import EngineConfig
from nanoflow.server.app import create_app, load_front_end_tokenizer
from nanoflow.server.engine_client import EngineClient
from nanoflow.server.replicas import ReplicaPool


class GracefulServer(uvicorn.Server):
    """On SIGINT/SIGTERM, uvicorn stops accepting connections; this also ends every in-flight
    request at once (finish reason 'abort'), so open streams close instead of running to
    completion, and the app's lifespan then stops the engine process."""

    def __init__(self, config: uvicorn.Config, client: EngineClient | ReplicaPool) -> None:
        super().__init__(config)
        self.client = client

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            loop = None
        if loop is not None and self.client.info is not None:
            loop.call_soon_threadsafe(self.client.abort_all)
        super().handle_exit(sig, frame)


def serve(
    config: EngineConfig,
    model_name: str,
    host: str = "127.0.0.1",
    port: int = 8000,
    api_key: str | None = None,
    verbose: bool = False,
    shutdown_timeout: float = 5.0,
    data_parallel_size: int = 1,
) -> bool:
    """Serve until a signal arrives; False if the server never started (e.g. port in use)."""
    log_level = logging.INFO if verbose else logging.WARNING
    tokenizer = load_front_end_tokenizer(config)
    app = create_app(config, model_name, api_key, log_level, tokenizer, data_parallel_size)
    uv_config = uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level="info" if verbose else "warning",
        timeout_graceful_shutdown=shutdown_timeout,
    )
    server = GracefulServer(uv_config, app.state.client)
    server.run()
    return server.started
