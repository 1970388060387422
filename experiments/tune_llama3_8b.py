"""GPU run of the autotuner for llama-3-8b (dummy weights, 512/512), in one call.

1. `nanoflow tune`'s path: profile the ops, search, validate the top candidates, write the profile
   (default profiles/llama-3-8b/<gpu>.json) and check it loads.
2. Offline throughput in the same run, on one engine, for the sequential executor, the default
   overlapped schedule (both at the default token budget) and the tuned profile.
3. One JSON (device, versions, command, commit, date), DIR/<gpu>/tune/<model>.json, beside the
   profiled tables, DIR/<gpu>/tune/<model>-tables.json (DIR: --out, default experiments/results).

Usage: python experiments/tune_llama3_8b.py [--num-prompts N] [--trials N] [--profile-out PATH]
           [--quantization fp8]   (profile: profiles/<model>/<gpu>-fp8.json)
       python experiments/tune_llama3_8b.py --device cpu --model builtin --tables-in roofline \
           --workload 24/6 --num-prompts 4 --trials 20 --max-batch 128   (a dry run)
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from pathlib import Path

import torch
from common import add_out_argument, result_path, write_result

from nanoflow import LLM, SamplingParams
from nanoflow.autotune.options import TuneOptions
from nanoflow.autotune.tuner import tune
from nanoflow.engine.schedule_select import DEFAULT_TOKEN_BUDGET, architecture_schedule
from nanoflow.measure import environment, gemm_ceiling_tflops, optimal_throughput
from nanoflow.models.loader import resolve_model
from nanoflow.runtime.profile import load_profile, profile_path, save_profile
from nanoflow.runtime.schedule import sequential_schedule
from nanoflow.workloads import load_workload, random_prompts


def throughput(llm: LLM, prompts: list[list[int]], output_len: int) -> dict:
    params = SamplingParams(max_tokens=output_len, temperature=0.0, ignore_eos=True)
    llm.generate(prompts[:8], SamplingParams(max_tokens=4, ignore_eos=True), use_tqdm=False)
    llm.engine.runner.synchronize()
    started = time.perf_counter()
    outputs = llm.generate(prompts, params, use_tqdm=False)
    llm.engine.runner.synchronize()
    elapsed = time.perf_counter() - started
    tokens = sum(len(p) for p in prompts) + sum(len(o.outputs[0].token_ids) for o in outputs)
    return {
        "elapsed_s": elapsed,
        "tokens_per_s": tokens / elapsed,
        "preemptions": sum(int(o.metrics["num_preemptions"]) for o in outputs),
    }


def compare(args: argparse.Namespace, profile_file: Path, device: torch.device) -> dict:
    """Offline throughput of each schedule on one engine (the weights are loaded once)."""
    tuned = load_profile(profile_file, resolve_model(args.model)[0].architecture_hash(), device)
    llm = LLM(
        args.model,
        load_format=load_format(args.model),
        device=str(device),
        max_num_batched_tokens=max(DEFAULT_TOKEN_BUDGET, tuned.dense_batch_size),
        num_kv_blocks=args.num_kv_blocks,
        max_num_seqs=args.max_num_seqs,
        kv_cache_dtype=args.kv_cache_dtype,
        quantization=args.quantization,
    )
    runs = {
        "sequential": (sequential_schedule(), DEFAULT_TOKEN_BUDGET),
        "default_overlapped": (
            architecture_schedule(llm.engine.config, device),
            DEFAULT_TOKEN_BUDGET,
        ),
        "tuned_profile": (tuned.schedule, tuned.dense_batch_size),
    }
    requests = load_workload(args.workload, args.num_prompts, args.seed)
    prompts = random_prompts(requests, llm.engine.spec.vocab_size, args.seed)
    output_len = requests[0].output_len
    results = {}
    for name, (schedule, tokens) in runs.items():
        llm.engine.runner.set_schedule(schedule)
        llm.engine.scheduler.max_num_batched_tokens = tokens
        results[name] = {"token_budget": tokens, **throughput(llm, prompts, output_len)}
        print(name, json.dumps(results[name]), flush=True)
    return results


def load_format(model: str) -> str:
    return "auto" if model == "builtin" else "dummy"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    add_out_argument(parser)
    parser.add_argument("--model", default="llama-3-8b")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--workload", default="512/512")
    parser.add_argument("--trials", type=int, default=300)
    parser.add_argument("--top-k", type=int, default=4)
    parser.add_argument("--num-prompts", type=int, default=300)
    parser.add_argument("--tables-in", default=None, help="skip profiling ('roofline' on CPU)")
    parser.add_argument("--profile-out", default=None)
    parser.add_argument("--max-batch", type=int, default=16384)
    parser.add_argument("--num-kv-blocks", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-num-seqs", type=int, default=512)
    parser.add_argument("--kv-cache-dtype", default="auto", choices=["auto", "fp8"])
    parser.add_argument("--quantization", default=None, choices=["fp8"])
    args = parser.parse_args()
    device = torch.device(args.device)
    record = {
        **environment(device),
        "experiment": "tune",
        "model": args.model,
        "quantization": args.quantization,
    }
    label = Path(args.model).name + (f"-{args.quantization}" if args.quantization else "")
    tables = result_path(args.out, record["gpu"], "tune", f"{label}-tables")
    tables.parent.mkdir(parents=True, exist_ok=True)
    result = tune(
        TuneOptions(
            model=args.model,
            load_format=load_format(args.model),
            workload=args.workload,
            trials=args.trials,
            top_k=args.top_k,
            seed=args.seed,
            tables_in=args.tables_in,
            tables_out=str(tables),
            device=str(device),
            validate=True,
            max_batch=args.max_batch,
            num_kv_blocks=args.num_kv_blocks,
            max_num_seqs=args.max_num_seqs,
            kv_cache_dtype=args.kv_cache_dtype,
            quantization=args.quantization,
            command=" ".join([sys.executable, *sys.argv]),
        )
    )
    profile = result.profile
    profile_file = Path(
        args.profile_out or profile_path(args.model, record["gpu"], variant=args.quantization)
    )
    save_profile(profile, profile_file)
    result.engine = None  # free the validation engine before the throughput engine loads
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    record["tuning"] = {
        "tuning_seconds": profile.tuning_seconds,
        "profile_path": str(profile_file),
        "profile": profile.to_dict(),
        "predicted_iteration_s": profile.predicted_iteration_s,
        "measured_iteration_s": profile.measured_iteration_s,
        "candidates": [
            {
                "dense_batch_size": m.candidate.dense_batch_size,
                "nano_batches": m.candidate.schedule.num_nano_batches,
                "units": {u.name: u.num_sms for u in m.candidate.schedule.units},
                "predicted_iteration_s": m.candidate.predicted_iteration_s,
                "measured_iteration_s": m.iteration_s,
            }
            for m in result.measured
        ],
    }
    print(json.dumps(record["tuning"]["candidates"], indent=1), flush=True)
    record["throughput"] = compare(args, profile_file, device)
    if device.type == "cuda":
        tflops = gemm_ceiling_tflops(device)
        optimal = optimal_throughput(resolve_model(args.model)[0], tflops * 1e12)
        record.update(gemm_tflops=tflops, optimal_tokens_per_s=optimal)
        for row in record["throughput"].values():
            row["fraction_of_optimal"] = row["tokens_per_s"] / optimal
    print(write_result(args.out, "tune", label, record))
    print(f"{'schedule':<20} {'budget':>6} {'tokens/s':>10}")
    for name, row in record["throughput"].items():
        print(f"{name:<20} {row['token_budget']:>6} {row['tokens_per_s']:>10.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
