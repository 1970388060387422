"""The timeline of one iteration from the profiler's kernel records (CUPTI), with no timing event
inside the iteration, so it shows the pipeline as it runs.

Per schedule: the fixed iteration of ``pipeline_bench.py`` (budget/4 decodes at ``--context``
beside ``--prefill-chunks`` prompt chunks of budget/4 tokens) in its CUDA-graph shape runs once
eagerly with every op launch in a labelled profiler range; with ``--launch graph`` it is then
captured and one replay is traced, its kernels labelled from the eager ones
(``nanoflow.runtime.trace_timeline``). Each timeline keeps its traced span beside the same
iteration timed without the profiler (CUDA events outside the graph only).

Writes DIR/<gpu>/timeline/<label>.json and <label>.png per schedule and launch mode, and the raw
Chrome traces in <label>_raw/.

Usage: python experiments/timeline_trace.py --schedules S[,S...] [--launch graph,eager]
           [--budget N --context N --prefill-chunks N] [--label L] [--out DIR]
       python experiments/timeline_trace.py --device cpu --model builtin --budget 64 \\
           --context 48   (a dry run: eager, host ranges)
"""

from __future__ import annotations

import argparse
import dataclasses
import gzip
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from bench_schedules import candidate_schedules
from common import add_out_argument, result_path, stamp
from pipeline_bench import fixed_plan
from plots import timeline_figure

from nanoflow import LLM
from nanoflow.engine.model_runner import ModelRunner
from nanoflow.engine.scheduler import BatchPlan
from nanoflow.measure import environment, time_cuda
from nanoflow.runtime.schedule import PipelineSchedule
from nanoflow.runtime.static_step import cuda_capture
from nanoflow.runtime.timeline import save_timeline
from nanoflow.runtime.trace_timeline import (
    Mapping,
    chrome_trace,
    label_eager,
    label_ranges,
    label_replay,
    labelled_ops,
    span_ms,
    timeline_records,
)

LAUNCHES = ("graph", "eager")


@dataclasses.dataclass
class Traced:
    """One launch mode's labelled activities, its untimed iteration and the raw traces."""

    mapping: Mapping
    untimed_ms: float
    traces: dict[str, dict[str, Any]]


def untimed_ms(fn: Callable[[], None], device: torch.device, graph: bool) -> float:
    """Median ms of ``fn`` without the profiler: CUDA events around it (a replay queued behind a
    spin kernel, so its launch is not timed), the host clock on CPU."""
    if device.type == "cuda":
        return time_cuda(fn, iters=20, queue_ahead=graph) * 1e3
    times = []
    for _ in range(5):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return sorted(times)[2] * 1e3


def trace_schedule(
    runner: ModelRunner, plan: BatchPlan, schedule: PipelineSchedule, modes: list[str]
) -> dict[str, Traced]:
    """The iteration under ``schedule`` traced in each launch mode of ``modes``."""
    device = runner.device
    runner.set_schedule(schedule)
    graph = "graph" in modes
    capture = cuda_capture(torch.cuda.graph_pool_handle()) if graph else lambda run: run
    step = runner.step_graphs(capture).prepare(plan)
    if step is None:
        raise SystemExit("the fixed iteration fits no graph shape: lower --prefill-chunks")
    labelled = labelled_ops(runner.model.layer_ops, schedule)

    def eager(layer_ops) -> None:
        runner.model.embed(step.input_ids, runner.buffers)
        runner.executor.run(layer_ops, runner.buffers, step.nano_batches)

    out = {}
    with torch.inference_mode():
        eager(labelled)  # kernels compiled and tuned outside the trace
        trace = chrome_trace(lambda: eager(labelled), device)
        expected = label_eager(trace) if device.type == "cuda" else label_ranges(trace)
        if "eager" in modes:
            mapping = Mapping(expected, "launch ranges", 0, 0)
            plain = untimed_ms(lambda: eager(runner.model.layer_ops), device, graph=False)
            out["eager"] = Traced(mapping, plain, {"eager": trace})
        if graph:
            step.replay()  # captures the graph, then replays it
            step.replay()
            replay = chrome_trace(step.replay, device)
            mapping = label_replay(replay, expected)
            replayed = untimed_ms(step.replay, device, graph=True)
            out["graph"] = Traced(mapping, replayed, {"eager": trace, "replay": replay})
    return out


def write(traced: Traced, path: Path, provenance: dict[str, Any], layers: int) -> dict:
    """The timeline JSON, its figure and the raw traces; returns the JSON's summary."""
    mapping = traced.mapping
    summary = {
        "timing": "profiler activities (CUPTI on a GPU, host ranges on CPU)",
        "traced_span_ms": span_ms(mapping.labelled),
        "untimed_ms": traced.untimed_ms,
        "mapping": mapping.method,
        "activities": len(mapping.labelled),
        "outside_every_op": sum(launch is None for launch, _ in mapping.labelled),
        "unmatched_activities": mapping.unmatched,
        "missing_activities": mapping.missing,
    }
    records = timeline_records(mapping.labelled, layers)
    save_timeline(records, path, stamp({**provenance, **summary}))
    figure = timeline_figure(json.loads(path.read_text()), path.stem, path.with_suffix(".png"))
    raw = path.parent / f"{path.stem}_raw"
    raw.mkdir(exist_ok=True)
    for name, trace in traced.traces.items():
        (raw / f"{name}.trace.json.gz").write_bytes(gzip.compress(json.dumps(trace).encode()))
    return {"file": path.name, "figure": figure.name, **summary}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_out_argument(parser)
    parser.add_argument("--label", default=None, help="starts the result files' names")
    parser.add_argument("--model", default="llama-3-8b")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--schedules", default="hand-written", help="comma list of names")
    parser.add_argument(
        "--launch", default=None, help="graph,eager (default: both on a GPU, eager on CPU)"
    )
    parser.add_argument("--budget", type=int, default=2048, help="token budget per iteration")
    parser.add_argument("--context", type=int, default=1024, help="decode context")
    parser.add_argument("--prefill-chunks", type=int, default=3, help="prompt chunks of budget/4")
    parser.add_argument("--layers", type=int, default=4, help="layers the timeline keeps")
    parser.add_argument("--num-kv-blocks", type=int, default=None)
    parser.add_argument("--max-num-seqs", type=int, default=512)
    parser.add_argument("--kv-cache-dtype", default="auto", choices=["auto", "fp8"])
    parser.add_argument("--quantization", default=None, choices=["fp8"], help="FP8 weights")
    args = parser.parse_args()
    cuda = args.device.startswith("cuda")
    args.launch = (args.launch or ("graph,eager" if cuda else "eager")).split(",")
    if unknown := set(args.launch) - set(LAUNCHES):
        parser.error(f"--launch takes {', '.join(LAUNCHES)}, not {sorted(unknown)}")
    if "graph" in args.launch and not cuda:
        parser.error("--launch graph needs a CUDA device; use --launch eager on CPU")
    return args


def main() -> int:
    args = parse_args()
    device = torch.device(args.device)
    llm = LLM(
        args.model,
        load_format="auto" if args.model == "builtin" else "dummy",
        device=str(device),
        max_num_batched_tokens=args.budget,
        num_kv_blocks=args.num_kv_blocks,
        max_num_seqs=args.max_num_seqs,
        cuda_graphs=False,  # each schedule's graph is captured here, not at start-up
        kv_cache_dtype=args.kv_cache_dtype,
        quantization=args.quantization,
    )
    schedules = candidate_schedules(llm.engine.config, device)
    names = args.schedules.split(",")
    if missing := [n for n in names if n not in schedules]:
        raise SystemExit(f"unknown schedules {missing}; known: {', '.join(schedules)}")
    quarter = args.budget // 4
    plan = fixed_plan(llm, quarter, args.context, args.prefill_chunks, quarter)
    env = environment(device)
    base = args.label or f"ctx{args.context}-chunks{args.prefill_chunks}-budget{args.budget}"
    base += "-fp8kv" if args.kv_cache_dtype == "fp8" else ""
    base += "-fp8" if args.quantization else ""
    for name in names:
        traced = trace_schedule(llm.engine.runner, plan, schedules[name], args.launch)
        for mode, one in traced.items():
            label = f"{base}-{name.replace('/', '-')}-{mode}"
            how = "CUDA graph replay" if mode == "graph" else "eager launch"
            title = f"{args.model}, {name} ({how}), one {plan.num_tokens}-token iteration "
            title += f"({len(plan.decodes)} decodes)"
            provenance = {**env, "title": title, "schedule": name, "launch": mode}
            provenance["schedule_spec"] = schedules[name].to_dict()
            path = result_path(args.out, env["gpu"], "timeline", label)
            path.parent.mkdir(parents=True, exist_ok=True)
            print(label, json.dumps(write(one, path, provenance, args.layers)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
