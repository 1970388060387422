"""The ``nanoflow`` command: one subcommand per job, each in its own module."""

from __future__ import annotations

import argparse
import logging
import sys
from typing import NoReturn

from nanoflow.errors import NanoflowError
from nanoflow.options import add_options, options_from

# Modules of the optional extras in pyproject.toml, by the extra that installs them.
OPTIONAL_MODULES = {"optuna": "tune", "matplotlib": "tune", "triton": "gpu", "cuda": "gpu"}

SUBCOMMANDS = (
    "nanoflow.cli.generate",
    "nanoflow.cli.bench",
    "nanoflow.cli.serve",
    "nanoflow.cli.tune",
)


class Parser(argparse.ArgumentParser):
    """Reports a bad flag in one line (status 2), without the usage block."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}\n")


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each default; a None default is explained by the help sentence itself."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None:
            return action.help
        return super()._get_help_string(action)


def add_engine_args(parser: argparse.ArgumentParser) -> None:
    """The engine's flags, one per EngineConfig field, for every subcommand that builds one."""
    from nanoflow.config import EngineConfig

    parser.add_argument(
        "model",
        nargs="?",
        default="builtin",
        help="checkpoint folder, registry name (e.g. llama-3-8b) or 'builtin'",
    )
    add_options(parser, EngineConfig)


def engine_kwargs(args: argparse.Namespace) -> dict:
    """EngineConfig's keyword arguments (all but the model) from the parsed flags."""
    from nanoflow.config import EngineConfig

    return options_from(args, EngineConfig)


def _serve_as_worker(args: argparse.Namespace) -> bool:
    """Under torchrun every rank runs the same command; ranks other than 0 become workers."""
    from nanoflow.config import EngineConfig
    from nanoflow.engine.tensor_parallel import run_worker_from_env

    return run_worker_from_env(EngineConfig(model=args.model, **engine_kwargs(args)))


def build_parser() -> argparse.ArgumentParser:
    import importlib

    parser = Parser(prog="nanoflow", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    subparsers = parser.add_subparsers(dest="command", required=True)
    for name in SUBCOMMANDS:
        importlib.import_module(name).register(subparsers)
    for sub in _all_parsers(parser):
        sub.formatter_class = HelpFormatter
    return parser


def _all_parsers(parser: argparse.ArgumentParser) -> list[argparse.ArgumentParser]:
    """The parser and its subcommands' parsers, nested ones included."""
    found = [parser]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                found += _all_parsers(sub)
    return found


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        if hasattr(args, "tensor_parallel_size") and _serve_as_worker(args):
            return 0
        return int(args.func(args) or 0)
    except NanoflowError as exc:
        print(f"nanoflow: error: {exc}", file=sys.stderr)
        return 2
    except ModuleNotFoundError as exc:
        if exc.name not in OPTIONAL_MODULES:
            raise
        extra = OPTIONAL_MODULES[exc.name]
        print(
            f"nanoflow: error: {args.command} needs {exc.name}: pip install 'nanoflow[{extra}]'",
            file=sys.stderr,
        )
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
