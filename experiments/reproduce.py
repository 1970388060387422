"""One command per figure of the README and docs/: what the figure needs, in one device call, then
the figure redrawn from the results with plots.py.

    python experiments/reproduce.py FIGURE             print the device call and the redraw
    python experiments/reproduce.py FIGURE --run       run it here (a GPU machine), then redraw
    python experiments/reproduce.py FIGURE --redraw    redraw from the results tree only
    python experiments/reproduce.py FIGURE --dry-run   the same scripts, tiny and on CPU, then
                                                       the figure redrawn from the committed results

Results go to ``--out`` (default experiments/results) as ``<gpu>/<experiment>/<label>.json``;
from a remote device's output folder, copy its ``<gpu>/`` folder into experiments/results and run
``--redraw``. FIGURE is one of: throughput, ablation, latency, timeline.
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import plots
from common import COMMIT_ENV, FIGURES, RESULTS, ROOT, commit, gpu_name

H200_PROFILE = "profiles/llama-3-8b/nvidia-h200.json"
# the engine settings of the H200 runs the figures show: fp8 KV cache, 1024 sequences, graphs
H200_ENGINE = ("--kv-cache-dtype", "fp8", "--max-num-seqs", "1024")
OFFLINE = (
    "experiments/run.py",
    "--workloads",
    "512/512,1024/512,512/1024,splitwise,lmsys,sharegpt",
    "--executors",
    "sequential,nanobatch",
    "--profile",
    H200_PROFILE,
    "--num-prompts",
    "1000",
    *H200_ENGINE,
)
OFFLINE_CPU = (
    "experiments/run.py",
    "--model",
    "builtin",
    "--device",
    "cpu",
    "--num-prompts",
    "4",
    "--workloads",
    "16/4",
    "--no-peer",
    "--budget-s",
    "300",
)


@dataclass(frozen=True)
class Figure:
    """A figure: the commands that measure what it shows (each given ``--out``), their tiny CPU
    counterparts, and the name of the PNG plots.py draws (``<name>_<gpu>.png``)."""

    what: str
    png: str
    gpu: tuple[tuple[str, ...], ...]
    cpu: tuple[tuple[str, ...], ...]


FIGURES_BY_NAME = {
    "throughput": Figure(
        "offline throughput per workload and system, % of optimal on the bars, beside the "
        "transformers peer",
        "throughput",
        (OFFLINE,),
        (OFFLINE_CPU + ("--executors", "sequential"),),
    ),
    "ablation": Figure(
        "each executor and the tuned profile against the sequential executor run under the "
        "same engine setting",
        "ablation",
        (OFFLINE,),
        (OFFLINE_CPU + ("--executors", "sequential,nanobatch"),),
    ),
    "latency": Figure(
        "online latency (normalized latency, TTFT p99) against the request rate, ShareGPT-shaped",
        "latency",
        (
            (
                "experiments/online_latency.py",
                "--workload",
                "sharegpt",
                "--profile",
                H200_PROFILE,
                *H200_ENGINE,
                "--rates",
                "8,16,32,48,64,96",
                "--duration-s",
                "15",
            ),
        ),
        (
            (
                "experiments/online_latency.py",
                "--model",
                "builtin",
                "--workload",
                "16/4",
                "--rates",
                "2,4",
                "--duration-s",
                "0.5",
                "--min-prompts",
                "3",
                "--slo",
                "1e9",
                "--goodput",
                "ttft:1e9",
                "tpot:1e9",
            ),
        ),
    ),
    "timeline": Figure(
        "one overlapped iteration (1024 decodes at context 768 and a 1024-token prompt chunk), "
        "layers 0-3, replayed from its CUDA graph",
        "timeline_alternating",
        (
            (
                "experiments/pipeline_bench.py",
                "--label",
                "alternating",
                "--skip",
                "parity",
                "--skip",
                "overlap",
                "--skip",
                "throughput",
                "--cuda-graphs",
                "--budget",
                "4096",
                "--prefill-chunks",
                "1",
                "--context",
                "768",
                "--schedules",
                "sequential,overlap-attn-green-100/32-alternating",
                "--timeline",
                "overlap-attn-green-100/32-alternating",
            ),
        ),
        (  # a CPU records no timeline: this checks the same options run the same schedules
            (
                "experiments/pipeline_bench.py",
                "--label",
                "alternating",
                "--device",
                "cpu",
                "--model",
                "builtin",
                "--skip",
                "parity",
                "--skip",
                "throughput",
                "--budget",
                "64",
                "--prefill-chunks",
                "1",
                "--context",
                "48",
                "--schedules",
                "sequential,overlap-attn-all/66-high-alternating",
                "--timeline",
                "overlap-attn-all/66-high-alternating",
            ),
        ),
    ),
}


def command(args: tuple[str, ...], out: Path | str) -> list[str]:
    return [sys.executable, str(ROOT / args[0]), *args[1:], "--out", str(out)]


def device_call(figure: Figure) -> str:
    """The one shell line a GPU machine runs, from the repository root, writing under $OUT."""
    lines = [shlex.join(["python", *c, "--out"]) + ' "$OUT"' for c in figure.gpu]
    return f"{COMMIT_ENV}={commit() or 'unknown'} sh -c '" + " && ".join(lines) + "'"


def run_all(commands: tuple[tuple[str, ...], ...], out: Path) -> None:
    for args in commands:
        argv = command(args, out)
        print(f"[reproduce] {shlex.join(argv)}", flush=True)
        subprocess.run(argv, check=True, cwd=ROOT)


def redraw(figure: Figure, results: Path, figures: Path, gpu: str | None) -> list[Path]:
    """The figure's PNGs redrawn from ``results`` (``gpu``: that GPU's results alone)."""
    made = plots.make_all(results, figures, gpu)
    return [p for p in made if p.name.startswith(figure.png)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("figure", choices=sorted(FIGURES_BY_NAME))
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--run", action="store_true", help="run the device call here")
    mode.add_argument("--redraw", action="store_true", help="only redraw from --out")
    mode.add_argument("--dry-run", action="store_true", help="tiny CPU run, then redraw")
    parser.add_argument("--out", type=Path, default=None, help="results root")
    parser.add_argument("--figures", type=Path, default=None, help="default: experiments/figures")
    parser.add_argument("--gpu", default="NVIDIA H200", help="whose results --redraw draws")
    args = parser.parse_args(argv)
    figure = FIGURES_BY_NAME[args.figure]
    if args.dry_run:
        out = args.out or Path(tempfile.mkdtemp(prefix="reproduce-"))
        run_all(figure.cpu, out)
        made = redraw(figure, RESULTS, args.figures or out / "figures", args.gpu)
    elif args.run:
        out = args.out or RESULTS
        run_all(figure.gpu, out)
        made = redraw(figure, out, args.figures or FIGURES, gpu_name())
    elif args.redraw:
        made = redraw(figure, args.out or RESULTS, args.figures or FIGURES, args.gpu)
    else:
        print(f"{args.figure}: {figure.what}")
        print(f"device call (repository root):\n  {device_call(figure)}")
        print(
            "then copy $OUT/<gpu>/ into experiments/results/ and redraw:\n"
            f"  python experiments/reproduce.py {args.figure} --redraw --gpu '<GPU name>'"
        )
        return 0
    for path in made:
        print(f"[reproduce] figure {path}")
    if not made:
        print(f"[reproduce] no {figure.png} figure: the results hold nothing it can draw")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
