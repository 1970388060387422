"""The server's options (``nanoflow serve``'s flags beside the engine's): a field here becomes a
flag and reaches ``serve()`` as the keyword argument of its name."""

from __future__ import annotations

from dataclasses import dataclass

from nanoflow.errors import ConfigError
from nanoflow.options import option
from nanoflow.server.guard import DEFAULT_MAX_REQUEST_BYTES


@dataclass
class ServerConfig:
    host: str = option("127.0.0.1", "address to bind (the default serves this machine only)")
    port: int = option(8000, "TCP port to listen on")
    api_key: str | None = option(None, "require 'Authorization: Bearer KEY' on /v1")
    served_model_name: str | None = option(
        None, "model name clients must send (default: the model argument)"
    )
    data_parallel_size: int = option(
        1, "engine replicas (each a GPU or a tensor-parallel group) behind one front end"
    )
    shutdown_timeout: float = option(
        5.0,
        "grace period (s) running requests get to finish after SIGINT/SIGTERM; new ones get "
        "503, and streams still open then are cut with an error event",
    )
    max_request_bytes: int = option(
        DEFAULT_MAX_REQUEST_BYTES,
        "largest request body accepted; larger ones get 413 before they are read",
    )
    engine_restarts: int = option(
        0,
        "times the engine process is restarted after it dies; past that the server exits with "
        "status 1 so a supervisor can act",
    )

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"port must be between 0 and 65535, got {self.port}")
        for name in ("data_parallel_size", "max_request_bytes"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be a positive integer, got {getattr(self, name)}")
        for name in ("engine_restarts", "shutdown_timeout"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be 0 or more, got {getattr(self, name)}")
