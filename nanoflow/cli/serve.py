"""``nanoflow serve``: the OpenAI-compatible HTTP server (docs/architecture.md, "Serving")."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from nanoflow.cli.main import add_engine_args, engine_kwargs
from nanoflow.server.guard import DEFAULT_MAX_REQUEST_BYTES

if TYPE_CHECKING:
    from nanoflow.server.engine_process import PromptFaults


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {value}")
    return value


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("serve", help="serve a model over an OpenAI-compatible HTTP API")
    add_engine_args(p)
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: local only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on /v1")
    p.add_argument("--served-model-name", default=None, help="model name clients must send")
    p.add_argument(
        "--data-parallel-size",
        type=int,
        default=1,
        help="engine replicas (each a GPU or a tensor-parallel group) behind one front end",
    )
    p.add_argument(
        "--shutdown-timeout",
        type=float,
        default=5.0,
        help="grace period (s) running requests get to finish after SIGINT/SIGTERM; new ones "
        "get 503, and streams still open then are cut with an error event",
    )
    p.add_argument(
        "--max-request-bytes",
        type=_positive_int,
        default=DEFAULT_MAX_REQUEST_BYTES,
        help="largest request body accepted; larger ones get 413 before they are read",
    )
    p.add_argument(
        "--engine-restarts",
        type=_non_negative_int,
        default=0,
        help="times the engine process is restarted after it dies; past that the server exits "
        "with status 1 so a supervisor can act",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace, faults: PromptFaults | None = None) -> int:
    """``faults``: requests to fail inside the engine (for tests of the failure paths)."""
    from nanoflow.config import EngineConfig
    from nanoflow.server.http_server import serve

    config = EngineConfig(model=args.model, **engine_kwargs(args))
    return serve(
        config,
        args.served_model_name or args.model,
        host=args.host,
        port=args.port,
        api_key=args.api_key,
        verbose=args.verbose,
        shutdown_timeout=args.shutdown_timeout,
        data_parallel_size=args.data_parallel_size,
        max_request_bytes=args.max_request_bytes,
        engine_restarts=args.engine_restarts,
        faults=faults,
    )
