"""Does Triton compile inside a timed run, and what does it cost?

Each executor's offline run is made over a new, empty Triton cache, then (``--passes 2``) again
over the cache the first pass filled. A kernel specialisation first needed mid-run (an eager step
of a shape no warm-up took) is compiled inside the first pass's measured time and only loaded in
the second; `nanoflow bench throughput` logs each compilation. One JSON holds every pass.

    python experiments/jit_in_run.py --workload lmsys --executors sequential,auto \
        --profile profiles/llama-3-8b/nvidia-h200.json --kv-cache-dtype fp8 --max-num-seqs 1024
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import tempfile
from pathlib import Path
from typing import Any

from common import add_out_argument, slug, throughput_command, write_result

PASSES = ("empty cache", "warm cache")
# keys of a bench record that describe the run, not the machine it ran on
NOT_ENVIRONMENT = {"experiment", "executor", "command", "args", "model", "result", "date"}


def one_pass(args: argparse.Namespace, executor: str, cache: str, out: Path) -> dict[str, Any]:
    cmd = throughput_command(args, args.workload, executor, out)
    print(f"[jit] {executor} over {cache}: {' '.join(cmd)}", flush=True)
    subprocess.run(cmd, check=True, env=os.environ | {"TRITON_CACHE_DIR": cache})
    return json.loads(out.read_text())


def summarise(record: dict[str, Any], executor: str, cache_state: str) -> dict[str, Any]:
    result = record["result"]
    mix = result["iterations"]
    return {
        "executor": executor,
        "triton_cache": cache_state,
        "tokens_per_s": result["tokens_per_s"],
        "elapsed_s": result["elapsed_s"],
        "token_budget": result["token_budget"],
        "iterations": mix["iterations"],
        "gpu_busy_ms_per_iteration": mix["gpu_busy_ms_per_iteration"],
        "host_launch_ms_per_iteration": mix["host_launch_ms_per_iteration"],
        "cuda_graphs": result.get("cuda_graphs"),
        "triton_compiles": result["triton_compiles"],
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="llama-3-8b")
    p.add_argument("--device", default="cuda")
    p.add_argument("--workload", default="lmsys")
    p.add_argument("--num-prompts", type=int, default=1000)
    p.add_argument("--executors", default="sequential", help="comma list; auto runs --profile")
    p.add_argument("--profile", default=None)
    p.add_argument("--passes", type=int, choices=(1, 2), default=2)
    p.add_argument("--kv-cache-dtype", default="auto")
    p.add_argument("--max-num-seqs", type=int, default=None)
    p.add_argument("--max-num-batched-tokens", type=int, default=None)
    p.add_argument("--no-cuda-graphs", dest="cuda_graphs", action="store_false")
    p.add_argument("--label", default="", help="names the code variant measured")
    add_out_argument(p)
    args = p.parse_args(argv)
    args.cuda_graphs = args.cuda_graphs and args.device.startswith("cuda")
    executors = args.executors.split(",")
    if "auto" in executors and not args.profile:
        p.error("--executors auto runs a tuned profile: pass --profile")
    runs = []
    with tempfile.TemporaryDirectory() as scratch:
        for executor in executors:
            cache = tempfile.mkdtemp(prefix="triton-", dir=scratch)
            for state in PASSES[: args.passes]:
                record = one_pass(args, executor, cache, Path(scratch) / "run.json")
                runs.append(summarise(record, executor, state))
    environment = {k: v for k, v in record.items() if k not in NOT_ENVIRONMENT}  # the last pass's
    for run in runs:
        jit, busy = run["triton_compiles"], run["gpu_busy_ms_per_iteration"]
        print(
            f"{run['executor']:>10} {run['triton_cache']:>11}: {run['tokens_per_s']:8.0f} "
            f"tokens/s, GPU busy {busy:.1f} ms/iteration, {jit['compilations']} compilations "
            f"in the run ({jit['seconds']:.1f} s)"
        )
    label = f"{args.model}-{slug(args.workload)}" + (f"-{args.label}" if args.label else "")
    record = {
        **environment,
        "experiment": "jit_in_run",
        "model": args.model,
        "workload": args.workload,
        "label": args.label,
        "runs": runs,
    }
    print(write_result(args.out, "jit_in_run", label, record))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
