"""Every GPU experiment the README quotes, in one device call: offline throughput of nanoflow's
executors (sequential / nano-batches without overlap / overlapped, and the tuned profile when
given) on constant-length and dataset-shaped workloads, the transformers peer, optionally online
latency; then the figures and the results table. Each measurement is a subprocess (a fresh CUDA
context, so one crash or leak cannot skew the next) and writes its own stamped JSON.

Results go to ``--out`` (default experiments/results) as ``<gpu>/<experiment>/<label>.json``,
figures to ``--figures`` (default experiments/figures, or ``<out>/figures`` beside another
``--out``). A wall-clock budget (default 540 s with --quick, 3000 s otherwise) skips what would not
fit, recording it as skipped rather than running late.

Usage: python experiments/run.py --quick
       python experiments/run.py [--profile P] [--online] [--budget-s S]
       python experiments/run.py --model builtin --device cpu --num-prompts 4 \
           --workloads 16/4 --executors sequential --peer-workload 16/4   (CPU dry run)
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import plots
from common import (
    FIGURES,
    RESULTS,
    add_out_argument,
    gpu_name,
    result_path,
    slug,
    stopwatch,
    throughput_command,
    write_json,
)
from report import render

from nanoflow.config import EngineConfig
from nanoflow.kernels.decode_attention import CONFIG_ENV
from nanoflow.options import add_options

EXECUTORS = ("sequential", "nanobatch", "overlapped")
QUICK_WORKLOADS = ("512/512",)
ALL_WORKLOADS = ("512/512", "1024/512", "512/1024", "splitwise", "lmsys", "sharegpt")
HERE = Path(__file__).resolve().parent


class Runner:
    """Runs commands under one deadline and stamps what they write."""

    def __init__(self, results: Path, gpu: str | None, budget_s: float) -> None:
        self.results = results
        self.gpu = gpu
        self.deadline = time.monotonic() + budget_s
        self.log = results / "logs"
        self.log.mkdir(parents=True, exist_ok=True)

    def path(self, experiment: str, label: str) -> Path:
        return result_path(self.results, self.gpu, experiment, label)

    def run(self, name: str, cmd: list[str], out: Path, stamp: dict[str, Any]) -> bool:
        """Run ``cmd`` (which writes ``out``), then restamp ``out``; on failure or no time left,
        write a record saying so, so a missing number is explained next to the others."""
        left = self.deadline - time.monotonic()
        command = " ".join(cmd)
        if left < 30:
            write_json(out, {**stamp, "skipped": "time budget spent"}, command)
            return False
        print(f"[run] {name}: {command}", flush=True)
        out.unlink(missing_ok=True)
        log_name = f"{out.parent.name}-{out.stem}.log"
        with stopwatch() as elapsed, (self.log / log_name).open("w") as log:
            try:
                proc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, timeout=left)
                ok = proc.returncode == 0 and out.exists()
                error = None if ok else f"exit code {proc.returncode}; see logs/{log_name}"
            except subprocess.TimeoutExpired:
                ok, error = False, f"killed after {left:.0f} s (time budget)"
        record = json.loads(out.read_text()) if ok else {"error": error}
        write_json(out, {**record, **stamp, "wall_s": elapsed()}, command)
        print(f"[run] {name}: {'ok' if ok else error} ({elapsed():.0f} s)")
        return ok


def throughput_label(args: argparse.Namespace, executor: str) -> str:
    """The executor and each engine setting that changes the figure (sequential-graphs-fp8kv)."""
    label = ("tuned" if executor == "auto" else executor) + ("-graphs" if args.cuda_graphs else "")
    label += "-fp8kv" if args.kv_cache_dtype == "fp8" else ""
    label += f"-seqs{args.max_num_seqs}" if args.max_num_seqs else ""
    label += f"-budget{args.max_num_batched_tokens}" if args.max_num_batched_tokens else ""
    forced = os.environ.get(CONFIG_ENV)  # a decode launch configuration under test
    return label + ("-decode" + re.sub(r"\W+", "_", forced) if forced else "")


def throughput(runner: Runner, args: argparse.Namespace, workload: str, executor: str) -> None:
    label = throughput_label(args, executor)
    out = runner.path("throughput", f"{args.model}-{slug(workload)}-{label}")
    runner.run(
        f"throughput {workload} {label}",
        throughput_command(args, workload, executor, out),
        out,
        {
            "experiment": "throughput",
            "model": args.model,
            "workload": workload,
            "executor": label,
        },
    )


def peer(runner: Runner, args: argparse.Namespace) -> None:
    model = "tiny" if args.model == "builtin" else args.model
    out = runner.path("peer_transformers", model)
    cmd = [sys.executable, str(HERE / "peer_transformers.py"), "--model", model, "--device"]
    cmd += [args.device, "--workload", args.peer_workload, "--output-json", str(out)]
    cmd += ["--num-prompts", str(args.peer_prompts)]
    if args.quick:
        cmd += ["--modes", "static"]
    runner.run("transformers peer", cmd, out, {"experiment": "peer_transformers", "model": model})


def online(runner: Runner, args: argparse.Namespace) -> None:
    out = runner.path("online_latency", f"{args.model}-{slug(args.online_workload)}")
    cmd = [sys.executable, str(HERE / "online_latency.py"), "--model", args.model]
    cmd += ["--workload", args.online_workload, "--output-json", str(out)]
    if args.profile:
        cmd += ["--profile", args.profile]
    cmd += ["--kv-cache-dtype", args.kv_cache_dtype]
    if args.max_num_seqs:
        cmd += ["--max-num-seqs", str(args.max_num_seqs)]
    runner.run("online latency", cmd, out, {"experiment": "online_latency", "model": args.model})


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="512/512, 400 prompts, static peer only")
    p.add_argument("--model", default="llama-3-8b")
    p.add_argument("--workloads", default=None, help="comma list (default: by --quick)")
    p.add_argument("--executors", default=",".join(EXECUTORS), help="comma list ('': tuned only)")
    p.add_argument("--profile", default=None, help="also run the tuned profile")
    p.add_argument("--num-prompts", type=int, default=None, help="default 400 quick, 1000 full")
    p.add_argument("--peer-workload", default="512/512", help="constant IN/OUT lengths")
    p.add_argument("--peer-prompts", type=int, default=256)
    p.add_argument("--no-peer", action="store_true")
    # the engine's own flags; runs with a non-default one are labelled by it (label())
    engine_flags = ("device", "cuda_graphs", "kv_cache_dtype", "max_num_batched_tokens")
    add_options(p, EngineConfig, only=engine_flags)
    p.add_argument(
        "--max-num-seqs",
        type=int,
        default=None,
        help="nanoflow's running-sequence limit (runs are labelled -seqsN; default: the engine's)",
    )
    p.add_argument("--online", action="store_true", help="also run online latency")
    p.add_argument("--online-workload", default="sharegpt")
    add_out_argument(p)
    p.add_argument("--figures", type=Path, default=None, help="default: see the module's doc")
    p.add_argument("--budget-s", type=float, default=None, help="default 540 quick, 3000 full")
    args = p.parse_args(argv)
    if args.device == "auto":  # explicit index: the engine's torch.cuda.set_device needs one
        import torch

        args.device = "cuda:0" if torch.cuda.is_available() else "cpu"
    args.workloads = args.workloads or ",".join(QUICK_WORKLOADS if args.quick else ALL_WORKLOADS)
    args.num_prompts = args.num_prompts or (400 if args.quick else 1000)
    if args.cuda_graphs is None:
        args.cuda_graphs = args.device.startswith("cuda")
    args.budget_s = args.budget_s or (540.0 if args.quick else 3000.0)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    figures = args.figures or (FIGURES if args.out == RESULTS else args.out / "figures")
    runner = Runner(args.out, gpu_name(args.device), args.budget_s)
    executors = [e for e in args.executors.split(",") if e] + (["auto"] if args.profile else [])
    for i, workload in enumerate(args.workloads.split(",")):
        for executor in executors:
            throughput(runner, args, workload, executor)
        if i == 0 and not args.no_peer:
            peer(runner, args)
    if args.online:
        online(runner, args)
    for path in plots.make_all(runner.results, figures):
        print(f"[run] figure {path}")
    print(render(runner.results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
