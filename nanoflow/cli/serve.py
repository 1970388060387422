"""``nanoflow serve``: the OpenAI-compatible HTTP server (DESIGN §6)."""

from __future__ import annotations

import argparse

from nanoflow.cli.main import add_engine_args, engine_kwargs


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
        help="seconds open connections get to close after SIGINT/SIGTERM",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from nanoflow.config import EngineConfig
    from nanoflow.server.http_server import serve

    config = EngineConfig(model=args.model, **engine_kwargs(args))
    started = serve(
        config,
        args.served_model_name or args.model,
        host=args.host,
        port=args.port,
        api_key=args.api_key,
        verbose=args.verbose,
        shutdown_timeout=args.shutdown_timeout,
        data_parallel_size=args.data_parallel_size,
    )
    return 0 if started else 1
