"""``nanoflow serve``: the OpenAI-compatible HTTP server (docs/architecture.md, "Serving")."""

from __future__ import annotations

import argparse
import dataclasses
from typing import TYPE_CHECKING

from nanoflow.cli.main import add_engine_args, engine_kwargs
from nanoflow.options import add_options, options_from
from nanoflow.server.config import ServerConfig

if TYPE_CHECKING:
    from nanoflow.server.engine_process import PromptFaults


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("serve", help="serve a model over an OpenAI-compatible HTTP API")
    add_engine_args(p)
    add_options(p, ServerConfig)
    p.set_defaults(func=run)


def run(args: argparse.Namespace, faults: PromptFaults | None = None) -> int:
    """``faults``: requests to fail inside the engine (for tests of the failure paths)."""
    from nanoflow.config import EngineConfig
    from nanoflow.server.http_server import serve

    config = EngineConfig(model=args.model, **engine_kwargs(args))
    options = dataclasses.asdict(ServerConfig(**options_from(args, ServerConfig)))
    name = options.pop("served_model_name") or args.model
    return serve(config, name, verbose=args.verbose, faults=faults, **options)
