"""``nanoflow bench throughput``: offline throughput on random prompts of given lengths."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from nanoflow.cli import bench_serve
from nanoflow.cli.main import add_engine_args, engine_kwargs

if TYPE_CHECKING:
    from nanoflow.autotune.steady_state import SteadyBatch
    from nanoflow.autotune.tables import OpTables
    from nanoflow.engine.model_runner import ModelRunner
    from nanoflow.engine.scheduler import BatchPlan


def register(subparsers: argparse._SubParsersAction) -> None:
    bench = subparsers.add_parser("bench", help="benchmarks")
    kinds = bench.add_subparsers(dest="bench_kind", required=True)
    p = kinds.add_parser("throughput", help="offline throughput (input + output tokens/s)")
    add_engine_args(p)
    p.add_argument("--workload", default="512/512", help="IN/OUT lengths or a trace file")
    p.add_argument("--num-prompts", type=int, default=1000, help="requests in the run")
    p.add_argument("--output-json", default=None, help="also write the result to this JSON file")
    p.add_argument(
        "--tables",
        default=None,
        help="op tables for the overlap bound per iteration: a JSON file from `nanoflow tune "
        "--tables-out`, 'profile' to measure them before the run (GPU) or 'roofline'",
    )
    p.set_defaults(func=run_throughput)
    bench_serve.register(kinds)


def run_throughput(args: argparse.Namespace) -> int:
    import torch

    from nanoflow import LLM, SamplingParams
    from nanoflow.autotune.bound import compare, describe, iteration_bound
    from nanoflow.jit_log import CompileLog
    from nanoflow.measure import (
        copy_bandwidth_gbs,
        environment,
        gemm_ceiling_tflops,
        optimal_throughput,
    )
    from nanoflow.workloads import load_workload, random_prompts

    tables = _bound_tables(args)  # profiling needs the memory the engine's KV cache takes
    llm = LLM(args.model, **engine_kwargs(args))
    engine = llm.engine
    requests = load_workload(args.workload, args.num_prompts, args.seed)
    prompts = random_prompts(requests, engine.spec.vocab_size, args.seed)
    params = [
        SamplingParams(max_tokens=r.output_len, temperature=0.0, ignore_eos=True) for r in requests
    ]
    warmup = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
    llm.generate(prompts[: min(8, len(prompts))], warmup, use_tqdm=False)
    engine.runner.synchronize()
    graphs = engine.runner.graphs
    # decode-only shapes are captured at start-up, outside the timing
    startup_graphs = graphs.stats.summary() if graphs is not None else None
    engine.reset_stats()  # count the measured run only
    plans = _record_plans(engine.runner) if tables is not None else None
    with CompileLog() as compiles:
        started = time.perf_counter()
        outputs = llm.generate(prompts, params)
        engine.runner.synchronize()
        elapsed = time.perf_counter() - started
    num_in = sum(len(p) for p in prompts)
    num_out = sum(len(o.outputs[0].token_ids) for o in outputs)
    result = {
        "workload": args.workload,
        "num_prompts": len(prompts),
        "elapsed_s": elapsed,
        "input_tokens": num_in,
        "output_tokens": num_out,
        "tokens_per_s": (num_in + num_out) / elapsed,
        "output_tokens_per_s": num_out / elapsed,
        "requests_per_s": len(prompts) / elapsed,
        "schedule": engine.schedule_source,
        "pipeline_schedule": engine.schedule.to_dict(),
        "token_budget": engine.scheduler.max_num_batched_tokens,
        "num_kv_blocks": engine.runner.num_blocks,
        "preemptions": sum(int(o.metrics["num_preemptions"]) for o in outputs),
        "iterations": engine.stats.summary(),
        "triton_compiles": compiles.summary(),
    }
    if graphs is not None:
        result["cuda_graphs"] = graphs.stats.summary()
        result["cuda_graphs_before_the_run"] = startup_graphs
    device = engine.runner.device
    if device.type == "cuda":
        # allocator retries free cached memory and synchronize the device: they stall the host
        memory = torch.cuda.memory_stats(device)
        result["cuda_allocator"] = {
            key: memory.get(key, 0)
            for key in ("num_alloc_retries", "num_sync_all_streams", "num_device_alloc")
        }
        tflops = gemm_ceiling_tflops(device)
        optimal = optimal_throughput(engine.spec, tflops * 1e12) / args.tensor_parallel_size
        result.update(
            gemm_tflops=tflops,
            optimal_tokens_per_s=optimal,
            fraction_of_optimal=result["tokens_per_s"] / optimal,
        )
        torch.cuda.empty_cache()  # the KV cache holds most of the memory: measure in what is left
        try:
            copy_gbs = copy_bandwidth_gbs(device, gib=0.5)
        except torch.OutOfMemoryError:
            print("no GPU memory left to measure the copy rate: no roofline for this run")
        else:
            bound = engine.stats.bound_seconds(
                engine.spec, tflops * 1e12, copy_gbs * 1e9, args.tensor_parallel_size,
                engine.runner.kv_dtype.itemsize,
            )  # fmt: skip
            result.update(
                copy_gbs=copy_gbs, roofline_seconds=bound, fraction_of_roofline=bound / elapsed
            )
    if plans is not None:
        bounds = [iteration_bound(tables, engine.schedule, b, rows) for b, rows in plans]
        result["overlap_bound"] = {
            "tables": args.tables,
            "interference": tables.interference,  # what the pair terms read
            **compare(bounds, elapsed),
        }
    record = {
        **environment(device),
        "experiment": "throughput",
        "executor": args.executor,
        "command": " ".join(sys.argv),
        "args": vars(args) | {"func": None},
        "model": args.model,
        "result": result,
    }
    print(
        f"Throughput: {result['requests_per_s']:.2f} requests/s, "
        f"{result['tokens_per_s']:.1f} total tokens/s, "
        f"{result['output_tokens_per_s']:.1f} output tokens/s"
    )
    mix = result["iterations"]
    if mix.get("iterations"):
        print(
            f"Iterations: {mix['iterations']}, {mix['tokens_per_iteration']:.0f} tokens each "
            f"({mix['tokens_per_iteration'] / result['token_budget']:.0%} of the "
            f"{result['token_budget']}-token budget), {mix['decode_only_fraction']:.0%} without "
            "prompt tokens"
        )
        print(  # the host keeps up while its work stays under the GPU's busy time
            f"Per iteration, host: plan {mix['host_plan_ms_per_iteration']:.1f} ms, launch "
            f"{mix['host_launch_ms_per_iteration']:.1f} (of it prepare "
            f"{mix['host_prepare_ms_per_iteration']:.1f}), resolve "
            f"{mix['host_resolve_ms_per_iteration']:.1f}, waiting "
            f"{mix['host_wait_ms_per_iteration']:.1f}; GPU busy "
            f"{mix['gpu_busy_ms_per_iteration']:.1f}, idle {mix['gpu_idle_ms_per_iteration']:.1f}"
        )
    if "fraction_of_optimal" in result:
        print(
            f"Optimal (GEMM {result['gemm_tflops']:.0f} TFLOP/s): "
            f"{result['optimal_tokens_per_s']:.0f} tokens/s; reached "
            f"{100 * result['fraction_of_optimal']:.1f}%"
        )
    if "fraction_of_roofline" in result:
        print(
            f"Roofline of the iterations run (GEMM rate or copy {result['copy_gbs']:.0f} GB/s, "
            f"whichever binds each): {result['roofline_seconds']:.1f} s; reached "
            f"{100 * result['fraction_of_roofline']:.1f}%"
        )
    if "overlap_bound" in result:
        print(f"Overlap (op tables {args.tables}): {describe(result['overlap_bound'])}")
    else:
        print(f"No overlap bound: {_no_tables_reason(args)}")
    if "cuda_graphs" in result:
        g = result["cuda_graphs"]
        print(
            f"CUDA graphs: {g['graph_steps']} iterations replayed, {g['eager_steps']} eager; "
            f"{g['shapes_captured']} shapes captured in {g['capture_seconds']:.1f} s "
            "(inside the measured time)"
        )
        before = result["cuda_graphs_before_the_run"]
        print(
            f"  and {before['shapes_captured']} captured before it (start-up and warm-up) in "
            f"{before['capture_seconds']:.1f} s"
        )
    jit = result["triton_compiles"]
    if jit["compilations"]:
        print(
            f"Triton built {jit['compilations']} kernel specialisations inside the measured "
            f"time (compiled, or loaded from its disk cache: {jit['seconds']:.1f} s): "
            f"{jit['per_kernel']}"
        )
    if args.output_json:
        Path(args.output_json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output_json).write_text(json.dumps(record, indent=2, default=str))
    return 0


def _no_tables_reason(args: argparse.Namespace) -> str | None:
    if args.tables is None:
        return "no op tables (--tables)"
    if args.tensor_parallel_size > 1:
        return "op tables time one GPU's whole layer, not a tensor-parallel shard"
    return None


def _bound_tables(args: argparse.Namespace) -> OpTables | None:
    """The op tables the overlap bound reads, or None (``_no_tables_reason`` says why)."""
    if _no_tables_reason(args):
        return None
    from nanoflow.autotune.bound import tables_for
    from nanoflow.config import EngineConfig
    from nanoflow.models.loader import resolve_model

    config = EngineConfig(model=args.model, **engine_kwargs(args))
    device = config.torch_device()
    spec, _ = resolve_model(args.model)
    return tables_for(
        args.tables, spec, args.model, device, config.torch_dtype(device),
        config.torch_kv_dtype(device), config.quantization,
    )  # fmt: skip


def _record_plans(runner: ModelRunner) -> list[tuple[SteadyBatch, int]]:
    """Each launched iteration's shape as the op tables read it, through the runner's plan hook
    (a hook already there, tensor parallelism's broadcast, still runs)."""
    from nanoflow.autotune.bound import plan_batch

    plans: list[tuple[SteadyBatch, int]] = []
    previous = runner.on_plan

    def record(plan: BatchPlan) -> None:
        plans.append(plan_batch(plan))
        if previous is not None:
            previous(plan)

    runner.on_plan = record
    return plans
