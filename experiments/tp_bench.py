"""Tensor-parallel run in one call: a 70B-class model with dummy bf16 weights over N GPUs, offline
throughput per workload for the sequential executor and the overlapped pipeline (collectives on a
network unit), tokens/s per GPU, % of optimal, and the timeline of one overlapped iteration.

Usage: python experiments/tp_bench.py --model llama-3-70b --tp 2 [--workload 512/512 ...]
           [--out DIR]
Writes DIR/<gpu>/tp/<model>-tp<N>.json and the timeline to DIR/<gpu>/timeline/<model>-tp<N>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from pathlib import Path

import torch
from common import add_out_argument, result_path, stamp, write_json

from nanoflow import LLM, SamplingParams
from nanoflow.measure import environment, gemm_ceiling_tflops, optimal_throughput
from nanoflow.runtime.schedule import Mechanism, PipelineSchedule, UnitSpec, sequential_schedule
from nanoflow.runtime.timeline import TimelineRecorder, save_timeline
from nanoflow.workloads import load_workload, random_prompts


def overlapped_tp(num_sms: int, memory: int, network: int) -> PipelineSchedule:
    return PipelineSchedule(
        decode_shares=(0.5, 0.5),
        prefill_shares=(0.5, 0.5),
        units=(
            UnitSpec("compute", num_sms - memory),
            UnitSpec("memory", memory),
            UnitSpec("network", network),
        ),
        op_units={"compute": "compute", "memory": "memory", "network": "network"},
        mechanism=Mechanism.CTA_LIMIT,
        overlap=True,
    )


def offline(llm: LLM, workload: str, num_prompts: int) -> dict:
    requests = load_workload(workload, num_prompts, seed=0)
    prompts = random_prompts(requests, llm.engine.spec.vocab_size, seed=1)
    params = [
        SamplingParams(max_tokens=r.output_len, temperature=0.0, ignore_eos=True) for r in requests
    ]
    llm.engine.runner.synchronize()
    start = time.perf_counter()
    llm.generate(prompts, params, use_tqdm=False)
    llm.engine.runner.synchronize()
    elapsed = time.perf_counter() - start
    tokens = sum(r.input_len + r.output_len for r in requests)
    return {
        "workload": workload,
        "num_prompts": num_prompts,
        "elapsed_s": elapsed,
        "tokens_per_s": tokens / elapsed,
    }


def timeline(llm: LLM, path: Path, title: str) -> str:
    """Record one mid-run iteration of the overlapped pipeline on rank 0."""
    runner = llm.engine.runner
    prompts = random_prompts(load_workload("512/8", 64), llm.engine.spec.vocab_size, seed=3)
    for p in prompts:
        llm.engine.add_request(
            f"tl-{len(p)}-{id(p)}", p, SamplingParams(max_tokens=8, ignore_eos=True)
        )
    llm.engine.step()
    recorder = TimelineRecorder()
    recorder.attach(runner.executor)
    llm.engine.step()
    runner.executor.hook = None
    while llm.engine.has_unfinished:
        llm.engine.step()
    records = [r for r in recorder.records() if r.layer < 3]
    path.parent.mkdir(parents=True, exist_ok=True)
    save_timeline(records, path, stamp({**environment(runner.device), "title": title}))
    return path.name


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="llama-3-70b")
    parser.add_argument("--tp", type=int, default=2)
    parser.add_argument("--workload", action="append", default=None)
    parser.add_argument("--num-prompts", type=int, default=256)
    parser.add_argument("--budget", type=int, default=2048)
    parser.add_argument("--memory-sms", type=int, default=32)
    parser.add_argument("--network-sms", type=int, default=16)
    add_out_argument(parser)
    parser.add_argument("--device", default="auto", help="cpu for a gloo dry run")
    args = parser.parse_args()
    device = torch.device("cuda" if args.device == "auto" else args.device)
    record = {
        **environment(device),
        "experiment": "tp",
        "model": args.model,
        "tensor_parallel_size": args.tp,
        "nccl_max_ctas": os.environ.get("NCCL_MAX_CTAS"),
    }
    on_gpu = device.type == "cuda"
    if on_gpu:
        record["gemm_tflops"] = gemm_ceiling_tflops(device)
    llm = LLM(
        args.model,
        load_format="dummy",
        tensor_parallel_size=args.tp,
        max_num_batched_tokens=args.budget,
        device=args.device,
        dtype="bfloat16" if on_gpu else "float32",
        executor="sequential",
    )
    record["nccl_max_ctas"] = os.environ.get("NCCL_MAX_CTAS")
    label = f"{Path(args.model).name}-tp{args.tp}"
    path = result_path(args.out, record["gpu"], "tp", label)
    num_sms = record.get("sm_count", 132)
    schedules = {
        "sequential": sequential_schedule(),
        "overlapped": overlapped_tp(num_sms, args.memory_sms, args.network_sms),
    }
    record["schedules"] = {k: v.to_dict() for k, v in schedules.items()}
    optimal = None
    if on_gpu:
        optimal = optimal_throughput(llm.engine.spec, record["gemm_tflops"] * 1e12)
        record["optimal_tokens_per_s_per_gpu"] = optimal
    results = []
    try:
        for workload in args.workload or ["512/512"]:
            for name, schedule in schedules.items():
                llm.engine.runner.set_schedule(schedule)
                row = {"executor": name, **offline(llm, workload, args.num_prompts)}
                row["tokens_per_s_per_gpu"] = row["tokens_per_s"] / args.tp
                if optimal:
                    row["fraction_of_optimal"] = row["tokens_per_s_per_gpu"] / optimal
                results.append(row)
                print(json.dumps(row), flush=True)
                record["results"] = results
                write_json(path, record)
        if on_gpu:
            llm.engine.runner.set_schedule(schedules["overlapped"])
            record["timeline"] = timeline(
                llm,
                result_path(args.out, record["gpu"], "timeline", label),
                f"{args.model} TP={args.tp}, overlapped, layers 0-2 on rank 0",
            )
    except Exception as exc:
        record["error"] = f"{type(exc).__name__}: {exc}"
        traceback.print_exc()
    finally:
        llm.engine.shutdown()
    for wl in {r["workload"] for r in results}:
        rows = {r["executor"]: r["tokens_per_s"] for r in results if r["workload"] == wl}
        if len(rows) == 2:
            record.setdefault("speedup", {})[wl] = rows["overlapped"] / rows["sequential"]
    print(write_json(path, record))
    print(json.dumps(record.get("speedup")), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
