"""What every experiment script shares: where results go, what makes one quotable, timing and a
live server.

A result lives at ``<out>/<gpu>/<experiment>/<label>.json`` (``--out`` defaults to
``experiments/results``; the GPU folder is the GPU's slug, ``cpu`` without one), so a run on one
GPU never overwrites another's and a figure's inputs are one folder apart. Every result carries
the device, package versions, command, git commit and date of its run (``stamp``).

Scripts in this folder import it as a neighbour (``from common import ...``); tests put the folder
on ``sys.path`` first.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "experiments" / "results"
FIGURES = ROOT / "experiments" / "figures"
REQUIRED_KEYS = ("device", "versions", "command", "date")
# set by a caller that runs a copy of the tree without its git history (a remote device)
COMMIT_ENV = "NANOFLOW_COMMIT"


def add_out_argument(parser: argparse.ArgumentParser) -> None:
    """``--out DIR``: the root of the results tree to write into."""
    parser.add_argument(
        "--out",
        type=Path,
        default=RESULTS,
        help="results root; files go to DIR/<gpu>/<experiment>/<label>.json "
        "(default: experiments/results)",
    )


def gpu_folder(gpu: str | None) -> str:
    """The folder of a GPU's results: ``NVIDIA H200`` -> ``nvidia-h200``, the slug profiles are
    named by; ``cpu`` for none."""
    if not gpu or gpu.startswith(("cpu", "cuda", "unknown")):
        return "cpu"
    return re.sub(r"[^a-z0-9]+", "-", gpu.lower()).strip("-")


def gpu_name(device: Any = None) -> str | None:
    """The name of the GPU behind ``device`` (a torch device or its string; default: the current
    CUDA device when there is one), None on CPU."""
    import torch

    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    return torch.cuda.get_device_name(device) if device.type == "cuda" else None


def gpu_of(record: dict[str, Any]) -> str | None:
    """The GPU a result ran on: its ``gpu``, else a ``device`` that names one."""
    gpu = record.get("gpu")
    if gpu:
        return gpu
    device = str(record.get("device") or "")
    return None if gpu_folder(device) == "cpu" else device


def result_path(out: Path, gpu: str | None, experiment: str, label: str) -> Path:
    """``<out>/<gpu>/<experiment>/<label>.json``."""
    return Path(out) / gpu_folder(gpu) / experiment / f"{label}.json"


def slug(text: str) -> str:
    """A label part from free text: ``512/512`` -> ``512_512``, ``traces/a.csv`` -> ``a``."""
    return re.sub(r"[^A-Za-z0-9.]+", "_", Path(text).stem if "." in text else text)


def versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {"python": platform.python_version()}
    for pkg in ("nanoflow", "torch", "triton", "transformers"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = None
    return out


def commit() -> str | None:
    """The checkout's commit, marked ``-dirty`` when tracked files differ from it; from
    ``$NANOFLOW_COMMIT`` where the tree has no git history; None when neither says."""
    if os.environ.get(COMMIT_ENV):
        return os.environ[COMMIT_ENV]

    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(
                ["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=30
            )
        except (OSError, subprocess.TimeoutExpired):
            return None
        return done.stdout.strip() if done.returncode == 0 else None

    head = git("rev-parse", "HEAD")
    if not head:
        return None
    return head + ("-dirty" if git("status", "--porcelain", "--untracked-files=no") else "")


def command_line() -> str:
    """How this process was started, as one would type it again."""
    argv = ["python", *sys.argv] if sys.argv[0].endswith(".py") else sys.argv
    return " ".join(argv)


def stamp(record: dict[str, Any], command: str | None = None) -> dict[str, Any]:
    """``record`` with what makes a number quotable (device, versions, command, commit, date),
    filling in only what is missing."""
    out = dict(record)
    out.setdefault("versions", versions())
    out.setdefault("command", command if command is not None else command_line())
    out.setdefault("commit", commit())
    out.setdefault("date", datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"))
    out.setdefault("device", "unknown")
    return out


def write_json(path: Path, record: dict[str, Any], command: str | None = None) -> Path:
    """The stamped ``record`` at ``path`` (a file a caller named, e.g. ``--output-json``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(stamp(record, command), indent=2, default=str))
    return path


def write_result(
    out: Path,
    experiment: str,
    label: str,
    record: dict[str, Any],
    command: str | None = None,
) -> Path:
    """The stamped ``record`` at ``result_path(out, <its GPU>, experiment, label)``."""
    record = {"experiment": experiment, **record}
    return write_json(result_path(out, gpu_of(record), experiment, label), record, command)


def load_results(folder: Path) -> list[dict[str, Any]]:
    """Every result of a results tree (``<gpu>/<experiment>/<label>.json``, sorted by path),
    each with ``_file``, its path in the tree. Files without the required keys are skipped so a
    stray file cannot put an unsourced number in a table; ``earlier/`` and the raw folders of a
    run lie deeper and are not read."""
    out = []
    for path in sorted(Path(folder).glob("*/*/*.json")):
        try:
            record = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if isinstance(record, dict) and all(k in record for k in REQUIRED_KEYS):
            out.append(record | {"_file": path.relative_to(folder).as_posix()})
    return out


@contextmanager
def stopwatch() -> Iterator[Callable[[], float]]:
    """``with stopwatch() as elapsed: ...; elapsed()``: wall-clock seconds since entry (frozen
    at exit)."""
    started = time.perf_counter()
    stopped: list[float] = []
    yield lambda: (stopped[0] if stopped else time.perf_counter()) - started
    stopped.append(time.perf_counter())


def nanoflow_exe() -> str:
    """The console script of the running interpreter's environment (several may be installed;
    ``python -m`` from the repository root would let ``kernels/`` shadow a package)."""
    beside = Path(sys.executable).parent / "nanoflow"
    exe = str(beside) if beside.exists() else shutil.which("nanoflow")
    if exe is None:
        raise SystemExit("the `nanoflow` command is not installed: pip install -e .")
    return exe


def throughput_command(
    args: argparse.Namespace, workload: str, executor: str, out: Path
) -> list[str]:
    """``nanoflow bench throughput`` with the engine settings of ``args`` (model, device,
    num_prompts, cuda_graphs, kv_cache_dtype, max_num_seqs, max_num_batched_tokens, profile),
    writing ``out``."""
    cmd = [nanoflow_exe(), "bench", "throughput", args.model, "--load-format", "dummy"]
    cmd += ["--executor", executor, "--workload", workload, "--num-prompts", str(args.num_prompts)]
    cmd += ["--device", args.device, "--output-json", str(out)]
    cmd += ["--cuda-graphs" if args.cuda_graphs else "--no-cuda-graphs"]
    cmd += ["--kv-cache-dtype", args.kv_cache_dtype]
    if args.max_num_seqs:
        cmd += ["--max-num-seqs", str(args.max_num_seqs)]
    if args.max_num_batched_tokens:
        cmd += ["--max-num-batched-tokens", str(args.max_num_batched_tokens)]
    if executor == "auto":
        cmd += ["--profile", args.profile]
    return cmd


@contextmanager
def server(
    serve_args: list[str],
    log_path: Path,
    port: int | None = None,
    timeout_s: float = 300.0,
) -> Iterator[Any]:
    """A live ``nanoflow serve <serve_args>`` (its ``url``, ``log()``, ``command``), stopped on
    exit; fails with the server's log if it does not answer ``/health`` in ``timeout_s``."""
    from nanoflow.server.launch import ServerProcess

    process = ServerProcess(serve_args, port=port, log_path=log_path)
    try:
        process.start(timeout=timeout_s)
    except RuntimeError as exc:
        raise SystemExit(f"nanoflow serve did not start: {exc}") from exc
    try:
        yield process
    finally:
        process.stop()


def target_rows(
    measured: dict[str, float | None], goals: dict[str, tuple[float, str]]
) -> list[dict[str, Any]]:
    """A targets file's rows: each value a run measured beside its goal and direction (a
    target the run did not measure, its section failed, gives no row)."""
    return [
        {"name": name, "measured": value, "target": goals[name][0], "direction": goals[name][1]}
        for name, value in measured.items()
        if value is not None
    ]


def queued_seconds(fn: Callable[[], Any], iters: int = 20) -> float:
    """Median seconds of ``fn``'s GPU work, launched behind a spin kernel so a kernel shorter
    than its Python launch is not timed as the launch (the engine replays these from CUDA
    graphs); off the GPU one run's wall clock, as a dry run checks the path, not the speed."""
    import torch

    from nanoflow.measure import time_cuda

    if torch.cuda.is_available():
        return time_cuda(fn, iters=iters, warmup=3, queue_ahead=True)
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def rel_err(got: Any, want: Any) -> float:
    """Relative Frobenius error of ``got`` against ``want`` (tensors), in fp32."""
    return ((got.float() - want.float()).norm() / want.float().norm()).item()


def write_targets(out: Path, slug: str, record: dict[str, Any], rows: list[dict[str, Any]]) -> Path:
    """``out/targets/<slug>.json``: the run's device, command, commit and date beside the
    target rows computed from its own measurements; each row printed."""
    summary = {key: record.get(key) for key in ("gpu", "device", "command", "commit", "date")}
    summary["targets"] = rows
    path = write_json(Path(out) / "targets" / f"{slug}.json", summary)
    for row in rows:
        print(f"{row['name']:42s} {row['measured']:.3f} (target {row['target']})")
    return path
