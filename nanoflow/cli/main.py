"""The ``nanoflow`` command: one subcommand per job, each in its own module."""

from __future__ import annotations

import argparse
import logging
import sys

from nanoflow.errors import NanoflowError

# Modules of the optional extras in pyproject.toml, by the extra that installs them.
OPTIONAL_MODULES = {"optuna": "tune", "matplotlib": "tune", "triton": "gpu", "cuda": "gpu"}

SUBCOMMANDS = (
    "nanoflow.cli.generate",
    "nanoflow.cli.bench",
    "nanoflow.cli.serve",
    "nanoflow.cli.tune",
)


def add_engine_args(parser: argparse.ArgumentParser) -> None:
    """Flags shared by every subcommand that builds an engine."""
    parser.add_argument(
        "model",
        nargs="?",
        default="builtin",
        help="checkpoint folder, registry name (e.g. llama-3-8b) or 'builtin'",
    )
    parser.add_argument("--load-format", default="auto", choices=["auto", "safetensors", "dummy"])
    parser.add_argument("--tokenizer", default=None, help="tokenizer folder (default: the model's)")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--profile", default=None, help="tuning profile JSON from `nanoflow tune`")
    parser.add_argument(
        "--executor", default="auto", choices=["auto", "sequential", "nanobatch", "overlapped"]
    )
    parser.add_argument(
        "--max-num-batched-tokens",
        type=int,
        default=None,
        help="per-iteration token budget (default: the profile's, else 2048)",
    )
    parser.add_argument("--max-num-seqs", type=int, default=512)
    parser.add_argument("--max-model-len", type=int, default=None)
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    parser.add_argument("--num-kv-blocks", type=int, default=None)
    parser.add_argument("--tensor-parallel-size", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--cuda-graphs",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="replay iterations from CUDA graphs, one per padded step shape (default: on for a "
        "dense model on one GPU without weight offload)",
    )
    parser.add_argument(
        "--enable-prefix-caching",
        action="store_true",
        help="reuse the K/V of full prompt blocks that an earlier request computed",
    )
    parser.add_argument(
        "--kv-offload-gib",
        type=float,
        default=0.0,
        help="host memory (GiB) that keeps prefix blocks evicted from the GPU, for the next "
        "round of a conversation (needs --enable-prefix-caching)",
    )
    parser.add_argument(
        "--kv-cache-dtype",
        default="auto",
        choices=["auto", "fp8"],
        help="the KV cache's element type: the model's (auto) or float8 e4m3, which halves the "
        "bytes decode attention reads and doubles the sequences the cache holds",
    )
    parser.add_argument(
        "--offload-weights",
        default=None,
        choices=["cpu"],
        help="keep the layers that do not fit on the GPU in pinned host memory, streamed in",
    )
    parser.add_argument(
        "--offload-fraction",
        type=float,
        default=None,
        help="fraction of layers to offload (default: as few as GPU memory allows)",
    )


def engine_kwargs(args: argparse.Namespace) -> dict:
    return {
        "load_format": args.load_format,
        "tokenizer": args.tokenizer,
        "dtype": args.dtype,
        "device": args.device,
        "profile": args.profile,
        "executor": args.executor,
        "max_num_batched_tokens": args.max_num_batched_tokens,
        "max_num_seqs": args.max_num_seqs,
        "max_model_len": args.max_model_len,
        "block_size": args.block_size,
        "gpu_memory_utilization": args.gpu_memory_utilization,
        "num_kv_blocks": args.num_kv_blocks,
        "tensor_parallel_size": args.tensor_parallel_size,
        "seed": args.seed,
        "cuda_graphs": args.cuda_graphs,
        "enable_prefix_caching": args.enable_prefix_caching,
        "kv_offload_gib": args.kv_offload_gib,
        "kv_cache_dtype": args.kv_cache_dtype,
        "offload_weights": args.offload_weights,
        "offload_fraction": args.offload_fraction,
    }


def _serve_as_worker(args: argparse.Namespace) -> bool:
    """Under torchrun every rank runs the same command; ranks other than 0 become workers."""
    from nanoflow.config import EngineConfig
    from nanoflow.engine.tensor_parallel import run_worker_from_env

    return run_worker_from_env(EngineConfig(model=args.model, **engine_kwargs(args)))


def build_parser() -> argparse.ArgumentParser:
    import importlib

    parser = argparse.ArgumentParser(prog="nanoflow", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    subparsers = parser.add_subparsers(dest="command", required=True)
    for name in SUBCOMMANDS:
        importlib.import_module(name).register(subparsers)
    return parser


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
