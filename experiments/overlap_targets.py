"""The overlap issue's targets in one run: the best overlapped schedule against the sequential
executor on fixed iterations, each beside its bound; the tuned profile against the sequential
executor offline; the profiler timeline of the winning schedule.

1. Per configuration (bf16 weights with the bf16 cache; FP8 weights with the fp8 cache): the op
   tables are profiled (the bound), then one engine with CUDA graphs times two fixed iterations
   under every candidate schedule of ``bench_schedules.py``: 1024 decodes at context 768 beside
   1024 prompt tokens, and the steady state of 512/1024 at a 2048-token budget (its decodes
   capped by what the KV cache holds). Each schedule's GPU time sits beside its bound; the best
   overlapped schedule is set against the sequential executor, and a configuration's target is
   its worse iteration's ratio.
2. Offline, for the configuration whose sequential run of the first iteration was fastest:
   ``nanoflow bench throughput`` with ``--executor auto --profile P`` against
   ``--executor sequential`` on 512/1024 and sharegpt, ``--num-prompts`` each.
3. ``timeline_trace.py`` on the best overlapped schedule of that configuration (first
   iteration, replayed from its CUDA graph).

Writes DIR/<gpu>/overlap/llama-3-8b.json and DIR/targets/overlap.json (DIR defaulting to
experiments/results). Without a GPU it does a dry run (the builtin model, roofline tables, tiny
iterations, two schedules) into DIR/cpu/overlap/dry-run.json and writes no targets.

Usage: python experiments/overlap_targets.py [--out DIR] [--num-prompts N]
           [--sections iterations,offline,timeline]
"""

from __future__ import annotations

import argparse
import gc
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import pipeline_bench
import torch
from bench_schedules import candidate_schedules
from common import (
    add_out_argument,
    commit,
    nanoflow_exe,
    result_path,
    target_rows,
    write_json,
    write_targets,
)

from nanoflow import LLM
from nanoflow.autotune.bound import tables_for
from nanoflow.autotune.steady_state import WorkloadShape, steady_batch
from nanoflow.config import EngineConfig
from nanoflow.measure import environment
from nanoflow.models.loader import resolve_model
from nanoflow.runtime.profile import profile_path

GPU = torch.cuda.is_available()
DEVICE = torch.device("cuda" if GPU else "cpu")
MODEL = "llama-3-8b" if GPU else "builtin"
CONFIGS = {  # name: (quantization, kv cache dtype)
    "bf16": (None, "auto"),
    "fp8": ("fp8", "fp8"),
}
TARGETS = {  # name: (goal, direction)
    "fixed_iteration_speedup_bf16": (1.10, "higher"),
    "fixed_iteration_speedup_fp8": (1.10, "higher"),
    "measured_over_bound": (1.10, "lower"),
    "offline_tuned_over_sequential_512_1024": (1.05, "higher"),
    "offline_tuned_over_sequential_dataset": (1.05, "higher"),
}
DATASET = "sharegpt"


def iteration_shapes(tiny: bool) -> dict[str, dict[str, int]]:
    """The fixed iterations: decodes at a context beside prompt tokens in chunks."""
    if tiny:
        return {
            "mixed": {"decodes": 8, "context": 48, "prefill": 16, "chunks": 1},
            "decode_heavy": {"decodes": 12, "context": 64, "prefill": 4, "chunks": 1},
        }
    steady = steady_batch(2048, WorkloadShape(512, 1024))
    return {
        "mixed": {"decodes": 1024, "context": 768, "prefill": 1024, "chunks": 1},
        "decode_heavy": {"decodes": steady.decodes, "context": round(steady.decode_context),
                         "prefill": steady.prefill_tokens, "chunks": 1},
    }  # fmt: skip


def fitted(llm: LLM, shape: dict[str, int]) -> dict[str, int]:
    """``shape`` with its decodes cut to what the KV cache holds beside its prompt chunks."""
    block = llm.engine.config.block_size
    per_decode = -(-(shape["context"] + 1) // block)
    per_chunk = -(-(shape["prefill"] // shape["chunks"] + 1) // block)
    room = llm.engine.runner.num_blocks - shape["chunks"] * per_chunk
    return shape | {"decodes": min(shape["decodes"], max(1, room // per_decode))}


def best_overlapped(rows: dict[str, Any]) -> str | None:
    """The overlapped schedule with the shortest iteration (None if none ran)."""
    timed = {n: r for n, r in rows.items() if r.get("overlap") and "gpu_ms" in r}
    return min(timed, key=lambda n: timed[n]["gpu_ms"]) if timed else None


def time_schedules(llm: LLM, tables: Any, shape: dict[str, int], names: list[str]) -> dict:
    """Every schedule's GPU time on the fixed iteration ``shape``, beside its bound."""
    plan = pipeline_bench.fixed_plan(
        llm,
        shape["decodes"],
        shape["context"],
        shape["chunks"],
        shape["prefill"] // shape["chunks"],
    )
    schedules = candidate_schedules(llm.engine.config, DEVICE)
    rows: dict[str, Any] = {}
    for name in names:
        schedule = schedules[name]
        row: dict[str, Any] = {"overlap": schedule.overlap}
        try:
            llm.engine.runner.set_schedule(schedule)
            row |= pipeline_bench.time_iteration(llm, plan)
            row["bound"] = pipeline_bench.overlap_bound(tables, name, schedule, plan, row)
        except Exception as exc:  # a schedule the GPU cannot build is recorded, not fatal
            row["error"] = f"{type(exc).__name__}: {exc}"
        rows[name] = row
    best = best_overlapped(rows)
    out: dict[str, Any] = {"shape": shape, "tokens": plan.num_tokens, "schedules": rows,
                           "best_overlapped": best}  # fmt: skip
    sequential = rows.get("sequential", {})
    if best is not None and "gpu_ms" in sequential:
        out["speedup"] = sequential["gpu_ms"] / rows[best]["gpu_ms"]
        out["best_measured_over_bound"] = rows[best]["bound"]["measured_over_bound"]
        print(
            f"{shape}: best overlapped {best} {rows[best]['gpu_ms']:.2f} ms against "
            f"sequential {sequential['gpu_ms']:.2f} ms ({out['speedup']:.3f}x)",
            flush=True,
        )
    return out


def iterations_section(tiny: bool) -> dict[str, Any]:
    spec, _ = resolve_model(MODEL)
    names = ["sequential", "overlap-shared-all/32-high"] if tiny else None
    out: dict[str, Any] = {}
    for config, (quantization, kv) in CONFIGS.items():
        engine_config = EngineConfig(model=MODEL, device=str(DEVICE), kv_cache_dtype=kv)
        dtype, kv_dtype = engine_config.torch_dtype(DEVICE), engine_config.torch_kv_dtype(DEVICE)
        source = "roofline" if tiny else "profile"
        tables = tables_for(source, spec, MODEL, DEVICE, dtype, kv_dtype, quantization)
        # the fixed plans bypass the scheduler; few sequences keep start-up capture short (each
        # schedule below captures its own graphs)
        llm = LLM(MODEL, load_format="auto" if tiny else "dummy", device=str(DEVICE),
                  max_num_batched_tokens=64 if tiny else 4096, max_num_seqs=16,
                  cuda_graphs=GPU, kv_cache_dtype=kv, quantization=quantization)  # fmt: skip
        chosen = names or list(candidate_schedules(llm.engine.config, DEVICE))
        out[config] = {
            "quantization": quantization,
            "kv_cache_dtype": kv,
            "iterations": {
                label: time_schedules(llm, tables, fitted(llm, shape), chosen)
                for label, shape in iteration_shapes(tiny).items()
            },
        }
        del llm
        gc.collect()
        if GPU:
            torch.cuda.empty_cache()
    return out


def offline_pair(workload: str, config: str, args: argparse.Namespace, tiny: bool) -> dict:
    """The tuned profile against the sequential executor on ``workload``."""
    quantization, kv = CONFIGS[config]
    gpu = environment(DEVICE).get("gpu")
    profile = profile_path(MODEL, gpu, variant="fp8" if quantization else None)
    base = [nanoflow_exe(), "bench", "throughput", MODEL, "--workload", workload,
            "--num-prompts", str(args.num_prompts), "--kv-cache-dtype", kv,
            "--max-num-seqs", "1024", "--device", str(DEVICE)]  # fmt: skip
    base += ["--load-format", "dummy", "--cuda-graphs"] if not tiny else []
    base += ["--quantization", quantization] if quantization else []
    runs: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as folder:
        for executor, extra in (("sequential", []), ("tuned", ["--profile", str(profile)])):
            path = Path(folder) / f"{executor}.json"
            command = [*base, "--executor", "auto" if extra else executor, *extra,
                       "--output-json", str(path)]  # fmt: skip
            if tiny and extra:  # no profile for the builtin model: the path is what is checked
                command = [c for c in command if c not in extra] + ["--executor", "sequential"]
            try:
                subprocess.run(command, check=True, timeout=args.run_timeout)
                result = json.loads(path.read_text())["result"]
            except (subprocess.SubprocessError, OSError, KeyError, ValueError) as exc:
                runs[executor] = {"command": " ".join(command[1:]), "error": repr(exc)}
                continue
            runs[executor] = {"command": " ".join(command[1:]),
                              "tokens_per_s": result["tokens_per_s"]}  # fmt: skip
            print(f"{workload} {executor}: {result['tokens_per_s']:.0f} tokens/s", flush=True)
    out: dict[str, Any] = {"workload": workload, "config": config, "runs": runs}
    if all("tokens_per_s" in runs.get(k, {}) for k in ("sequential", "tuned")):
        out["tuned_over_sequential"] = (
            runs["tuned"]["tokens_per_s"] / runs["sequential"]["tokens_per_s"]
        )
    return out


def fastest_config(record: dict[str, Any]) -> str:
    """The configuration whose sequential executor ran the mixed iteration fastest."""
    times = {}
    for config, found in (record.get("iterations") or {}).items():
        if not isinstance(found, dict) or "iterations" not in found:
            continue
        sequential = found["iterations"]["mixed"]["schedules"].get("sequential", {})
        if "gpu_ms" in sequential:
            times[config] = sequential["gpu_ms"]
    return min(times, key=times.get) if times else "fp8"


def timeline_section(record: dict[str, Any], config: str, out: Path, tiny: bool) -> dict:
    found = (record.get("iterations") or {}).get(config, {}).get("iterations", {})
    mixed = found.get("mixed", {})
    best = mixed.get("best_overlapped") or "nanobatch-2"
    shape = mixed.get("shape") or iteration_shapes(tiny)["mixed"]
    quantization, kv = CONFIGS[config]
    command = [sys.executable, str(Path(__file__).with_name("timeline_trace.py")),
               "--model", MODEL, "--device", str(DEVICE), "--schedules", best,
               "--budget", str(4 * shape["decodes"]), "--context", str(shape["context"]),
               "--prefill-chunks", "1", "--kv-cache-dtype", kv, "--label", f"overlap-{config}",
               "--max-num-seqs", str(2 * shape["decodes"]), "--out", str(out)]  # fmt: skip
    command += ["--launch", "graph"] if GPU else ["--launch", "eager"]
    command += ["--quantization", quantization] if quantization else []
    subprocess.run(command, check=True)
    return {"config": config, "schedule": best, "command": " ".join(command[1:])}


def targets(record: dict[str, Any]) -> list[dict[str, Any]]:
    """The issue's target rows from what this run measured (a failed section gives none): a
    configuration's speedup is its worse fixed iteration's, the bound ratio the winner's worse."""
    iterations = record.get("iterations") or {}

    def worst(config: str | None, key: str, pick: Any) -> float | None:
        found = (iterations.get(config) or {}).get("iterations", {}) if config else {}
        values = [it[key] for it in found.values() if it.get(key) is not None]
        return pick(values) if values and len(values) == len(found) else None

    offline = record.get("offline") or {}
    measured = {
        "fixed_iteration_speedup_bf16": worst("bf16", "speedup", min),
        "fixed_iteration_speedup_fp8": worst("fp8", "speedup", min),
        "measured_over_bound": worst(record.get("winner"), "best_measured_over_bound", max),
        "offline_tuned_over_sequential_512_1024": (offline.get("512/1024") or {}).get(
            "tuned_over_sequential"
        ),
        "offline_tuned_over_sequential_dataset": (offline.get(DATASET) or {}).get(
            "tuned_over_sequential"
        ),
    }
    return target_rows(measured, TARGETS)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_out_argument(parser)
    parser.add_argument("--sections", default="iterations,offline,timeline")
    parser.add_argument("--num-prompts", type=int, default=600 if GPU else 4)
    parser.add_argument("--run-timeout", type=float, default=150.0)
    args = parser.parse_args(argv)
    tiny = not GPU
    pipeline_bench.DEVICE = DEVICE
    sections = set(args.sections.split(","))
    env = environment(DEVICE)
    record: dict[str, Any] = {
        **env, "experiment": "overlap", "model": MODEL, "dry_run": tiny,
        "command": " ".join(["python", *sys.argv]), "commit": commit(),
    }  # fmt: skip
    started = time.perf_counter()
    if "iterations" in sections:
        try:
            record["iterations"] = iterations_section(tiny)
        except Exception as exc:  # the other sections still run
            print(f"section iterations failed: {exc!r}", file=sys.stderr, flush=True)
            record["iterations"] = {"error": repr(exc)}
    record["winner"] = fastest_config(record)
    if "offline" in sections:
        workloads = ["16/8"] if tiny else ["512/1024", DATASET]
        record["offline"] = {w: offline_pair(w, record["winner"], args, tiny) for w in workloads}
    if "timeline" in sections:
        try:
            record["timeline"] = timeline_section(record, record["winner"], args.out, tiny)
        except (subprocess.SubprocessError, OSError) as exc:
            record["timeline"] = {"error": repr(exc)}
    record["total_seconds"] = time.perf_counter() - started
    label = "dry-run" if tiny else MODEL
    print(write_json(result_path(args.out, env.get("gpu"), "overlap", label), record))
    if GPU:
        write_targets(args.out, "overlap", record, targets(record))
    return 0


if __name__ == "__main__":
    sys.exit(main())
