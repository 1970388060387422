"""``nanoflow tune``: profile a model's ops on this GPU, search the pipeline schedule, validate
the best candidates and write the profile the engine loads with ``--profile``."""

from __future__ import annotations

import argparse
import sys


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("tune", help="autotune the pipeline schedule, write a profile")
    p.add_argument("--model", required=True, help="registry name, checkpoint folder or builtin")
    p.add_argument("--load-format", default="auto", choices=["auto", "safetensors", "dummy"])
    p.add_argument("--workload", default="512/512", help="IN/OUT lengths, dataset or trace file")
    p.add_argument(
        "--out", required=True, help="profile JSON (convention: profiles/<model>/<gpu>.json)"
    )
    p.add_argument("--trials", type=int, default=200, help="search trials (cost-model evaluations)")
    p.add_argument("--top-k", type=int, default=4, help="candidates validated on the GPU")
    p.add_argument(
        "--tables-in",
        default=None,
        help="op tables JSON to reuse (skips profiling); 'roofline' for nominal H100 tables",
    )
    p.add_argument("--tables-out", default=None, help="where to save the op tables")
    p.add_argument("--storage", default=None, help="optuna storage, e.g. sqlite:///tune.db")
    p.add_argument("--device", default="auto")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-num-seqs", type=int, default=512, help="the engine's running limit")
    p.add_argument("--max-batch", type=int, default=16384, help="largest dense batch to try")
    p.add_argument(
        "--num-kv-blocks", type=int, default=None, help="KV blocks of the validation engine"
    )
    p.add_argument(
        "--kv-cache-dtype",
        default="auto",
        choices=["auto", "fp8"],
        help="the KV cache to tune for (an engine loading the profile must use the same)",
    )
    p.set_defaults(func=run)


def summary(result) -> str:
    """The end-of-run table: each candidate's prediction and, where validated, measurement."""
    rows = [(m.candidate, m.iteration_s, m.tokens_per_s) for m in result.measured] or [
        (c, None, c.predicted_tokens_per_s) for c in result.candidates
    ]
    lines = [f"{'dense':>6} {'nano':>4} {'units (SMs)':<30} {'pred ms':>8} {'meas ms':>8} tok/s"]
    for c, measured, tokens_per_s in rows:
        units = " ".join(f"{u.name}:{u.num_sms or 'all'}" for u in c.schedule.units)
        meas = f"{measured * 1e3:>8.2f}" if measured is not None else f"{'-':>8}"
        lines.append(
            f"{c.dense_batch_size:>6} {c.schedule.num_nano_batches:>4} {units:<30} "
            f"{c.predicted_iteration_s * 1e3:>8.2f} {meas} {tokens_per_s:.0f}"
        )
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    from nanoflow.autotune.tuner import TuneOptions, tune
    from nanoflow.runtime.profile import save_profile

    result = tune(
        TuneOptions(
            model=args.model,
            load_format=args.load_format,
            workload=args.workload,
            trials=args.trials,
            top_k=args.top_k,
            seed=args.seed,
            storage=args.storage,
            tables_in=args.tables_in,
            tables_out=args.tables_out,
            device=args.device,
            max_num_seqs=args.max_num_seqs,
            max_batch=args.max_batch,
            num_kv_blocks=args.num_kv_blocks,
            kv_cache_dtype=args.kv_cache_dtype,
            command=" ".join(["nanoflow", *sys.argv[1:]]),
        )
    )
    save_profile(result.profile, args.out)
    print(summary(result))
    p = result.profile
    print(
        f"chosen: dense batch {p.dense_batch_size}, {p.schedule.num_nano_batches} nano-batch(es), "
        f"{p.mechanism.value}; tuned in {p.tuning_seconds:.0f} s; profile written to {args.out}"
    )
    if not result.measured:
        print("(not validated: no GPU here; the times are the cost model's predictions)")
    return 0
