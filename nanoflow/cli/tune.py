"""``nanoflow tune``: profile a model's ops on this GPU, search the pipeline schedule, validate
the best candidates and write the profile the engine loads with ``--profile``."""

from __future__ import annotations

import argparse
import sys

from nanoflow.options import add_options, options_from


def register(subparsers: argparse._SubParsersAction) -> None:
    from nanoflow.autotune.options import TuneOptions

    p = subparsers.add_parser("tune", help="autotune the pipeline schedule, write a profile")
    p.add_argument(
        "--out", required=True, help="profile JSON (convention: profiles/<model>/<gpu>.json)"
    )
    add_options(p, TuneOptions)
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
    from nanoflow.autotune.options import TuneOptions
    from nanoflow.autotune.tuner import tune
    from nanoflow.runtime.profile import save_profile

    command = " ".join(["nanoflow", *sys.argv[1:]])
    result = tune(TuneOptions(**options_from(args, TuneOptions), command=command))
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
