"""Mixtral 8x7B (dummy weights) on one GPU, in one call: the expert GEMMs, graphs against eager,
and offline throughput with bf16 and FP8 experts.

1. Kernels, on Mixtral's expert shapes at 64, 512 and 2048 tokens: the fused Triton kernel, the
   grouped-GEMM path (bf16) and the FP8 grouped path, each checked against the reference
   (bf16: the same MoE in fp32 per expert; FP8: the same reference, within e4m3's error) and
   timed; TFLOP/s counted with the active FLOPs, as a fraction of the dense bf16 GEMM rate
   measured in this run, and at 64 tokens against the time of reading every expert's weights
   once at the copy rate measured in this run.
2. Graphs: the engine's greedy tokens for 16 prompts with step graphs, then with the same
   engine eager.
3. Offline 512/512, ``--num-prompts`` (2000) prompts, fp8 KV cache, sequential executor with
   graphs, through ``nanoflow bench throughput``: bf16 experts, then FP8 weights; the first as a
   fraction of the optimal throughput (active parameters, the bf16 GEMM rate of section 1).

Writes DIR/<gpu>/moe/mixtral-8x7b-grouped.json and DIR/targets/moe.json (DIR defaulting to
experiments/results). Without a GPU it does a dry run (tiny shapes and a tiny random Mixtral on
CPU) into DIR/cpu/moe/dry-run.json and writes no targets.

Usage: python experiments/moe_bench.py [--out DIR] [--sections kernels,graphs,throughput]
           [--num-prompts N]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

GPU = torch.cuda.is_available()
if not GPU:  # the Triton kernels run under the interpreter on CPU tensors
    os.environ.setdefault("TRITON_INTERPRET", "1")

from common import (  # noqa: E402
    add_out_argument,
    commit,
    nanoflow_exe,
    queued_seconds,
    rel_err,
    result_path,
    target_rows,
    write_json,
    write_targets,
)
from moe_offload_bench import tiny_checkpoint  # noqa: E402

from nanoflow import LLM, SamplingParams  # noqa: E402
from nanoflow.kernels.fp8_linear import quantize_weight  # noqa: E402
from nanoflow.kernels.moe import fused_moe_ref, fused_moe_triton  # noqa: E402
from nanoflow.kernels.moe_grouped import fused_moe_fp8, fused_moe_grouped  # noqa: E402
from nanoflow.measure import (  # noqa: E402
    copy_bandwidth_gbs,
    environment,
    gemm_ceiling_tflops,
    optimal_throughput,
)
from nanoflow.models.registry import get_known_model  # noqa: E402
from nanoflow.workloads import constant, random_prompts  # noqa: E402

DEVICE = torch.device("cuda" if GPU else "cpu")
MODEL = "mixtral-8x7b"
TARGETS = {  # name: (goal, direction)
    "grouped_gemm_frac_of_dense_2048": (0.6, "higher"),
    "mixtral_bf16_fraction_of_optimal": (0.35, "higher"),
    "mixtral_fp8_tokens_per_s": (12000.0, "higher"),
}
BF16_TOLERANCE = 0.02  # relative error of a bf16 MoE against the fp32 reference
FP8_TOLERANCE = 0.12  # e4m3 weights and activations against the unquantized reference


def kernel_section(tiny: bool, gemm_tflops: float | None, copy_gbs: float | None) -> dict:
    spec = get_known_model(MODEL)
    experts, top_k = spec.num_experts, spec.num_experts_per_token
    hidden, inter = (64, 96) if tiny else (spec.hidden_size, spec.intermediate_size)
    dtype = torch.bfloat16 if GPU else torch.float32
    w13 = (torch.randn(experts, 2 * inter, hidden, device=DEVICE) * hidden**-0.5).to(dtype)
    w2 = (torch.randn(experts, hidden, inter, device=DEVICE) * inter**-0.5).to(dtype)
    q13, q2 = quantize_weight(w13), quantize_weight(w2)
    weight_bytes = w13.nbytes + w2.nbytes
    rows: dict[str, Any] = {}
    for tokens in (16, 64) if tiny else (64, 512, 2048):
        x = torch.randn(tokens, hidden, device=DEVICE, dtype=dtype)
        weights, ids = torch.topk(
            torch.softmax(torch.randn(tokens, experts, device=DEVICE), -1), top_k, -1
        )
        weights /= weights.sum(-1, keepdim=True)
        want = fused_moe_ref(x, w13, w2, weights, ids)
        flops = 2 * tokens * top_k * 3 * hidden * inter
        routed = (weights, ids)
        paths = {
            "triton": (lambda r=routed, x=x: fused_moe_triton(x, w13, w2, *r), BF16_TOLERANCE),
            "grouped": (lambda r=routed, x=x: fused_moe_grouped(x, w13, w2, *r), BF16_TOLERANCE),
            "fp8_grouped": (lambda r=routed, x=x: fused_moe_fp8(x, q13, q2, *r), FP8_TOLERANCE),
        }
        row: dict[str, Any] = {}
        for name, (run, tolerance) in paths.items():
            err = rel_err(run(), want)
            seconds = queued_seconds(run)
            entry = {"ms": seconds * 1e3, "tflops": flops / seconds / 1e12, "rel_err_vs_ref": err,
                     "ok": err <= tolerance}  # fmt: skip
            if gemm_tflops:
                entry["frac_of_dense_gemm"] = entry["tflops"] / gemm_tflops
            if copy_gbs:
                read_bytes = (q13.data.nbytes + q2.data.nbytes) if "fp8" in name else weight_bytes
                entry["weight_read_bound_ms"] = read_bytes / (copy_gbs * 1e9) * 1e3
                entry["frac_of_weight_read_bound"] = entry["weight_read_bound_ms"] / entry["ms"]
            row[name] = entry
            print(f"moe {tokens:5d} tokens {name:12s} {entry['ms']:8.3f} ms "
                  f"{entry['tflops']:7.1f} TFLOP/s err {err:.4f}", flush=True)  # fmt: skip
        rows[str(tokens)] = row
    ok = all(entry["ok"] for row in rows.values() for entry in row.values())
    return {"shape": {"experts": experts, "top_k": top_k, "hidden": hidden, "inter": inter},
            "tokens": rows, "checks_ok": ok}  # fmt: skip


def graphs_section(tiny: bool) -> dict:
    """Greedy tokens of 16 prompts with step graphs, then eager on the same engine."""
    model = tiny_checkpoint(moe=True) if tiny else MODEL
    llm = LLM(model, load_format="auto" if tiny else "dummy", device=str(DEVICE),
              max_num_seqs=16, num_kv_blocks=1024, cuda_graphs=GPU)  # fmt: skip
    runner = llm.engine.runner
    if tiny:  # no CUDA graphs on CPU: the padded graph shapes, replayed eagerly
        runner.graphs = runner.step_graphs(lambda run: run)
    prompts = random_prompts(constant(64, 1, 16), llm.engine.spec.vocab_size, seed=2)
    params = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)

    def greedy(engine: LLM) -> list[list[int]]:
        return [o.outputs[0].token_ids for o in engine.generate(prompts, params, use_tqdm=False)]

    with_graphs = greedy(llm)
    graph_steps = runner.graphs.stats.graph_steps
    runner.graphs = None
    eager = greedy(llm)
    same = sum(a == b for a, b in zip(with_graphs, eager, strict=True))
    del llm, runner
    gc.collect()
    if GPU:
        torch.cuda.empty_cache()
    print(f"graphs: {same}/16 prompts give the eager tokens ({graph_steps} graph steps)")
    return {"prompts": 16, "identical": same, "graph_steps": graph_steps,
            "checks_ok": same == 16 and graph_steps > 0}  # fmt: skip


def throughput_section(args: argparse.Namespace, tiny: bool, gemm_tflops: float | None) -> dict:
    model = tiny_checkpoint(moe=True) if tiny else MODEL
    base = [nanoflow_exe(), "bench", "throughput", model,
            "--load-format", "auto" if tiny else "dummy", "--executor", "sequential",
            "--workload", "16/8" if tiny else "512/512", "--num-prompts", str(args.num_prompts),
            "--kv-cache-dtype", "fp8", "--max-num-seqs", "1024"]  # fmt: skip
    base += ["--cuda-graphs", "--device", "cuda"] if GPU else ["--device", "cpu"]
    runs: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as folder:
        for weights, extra in (("bf16", []), ("fp8", ["--quantization", "fp8"])):
            path = Path(folder) / f"{weights}.json"
            command = [*base, *extra, "--output-json", str(path)]
            try:
                subprocess.run(command, check=True, timeout=args.run_timeout)
                result = json.loads(path.read_text())["result"]
            except (subprocess.SubprocessError, OSError, KeyError, ValueError) as exc:
                runs[weights] = {"command": " ".join(command[1:]), "error": repr(exc)}
                print(f"{weights} weights failed: {exc!r}", flush=True)
                continue
            runs[weights] = {"command": " ".join(command[1:]),
                             "tokens_per_s": result["tokens_per_s"], "result": result}  # fmt: skip
            print(f"512/512 {weights} weights: {result['tokens_per_s']:.0f} tokens/s", flush=True)
    ok = all("tokens_per_s" in run for run in runs.values())
    out: dict[str, Any] = {"num_prompts": args.num_prompts, "runs": runs, "checks_ok": ok}
    if gemm_tflops:
        optimal = optimal_throughput(get_known_model(MODEL), gemm_tflops * 1e12)
        out["optimal_tokens_per_s"] = optimal
        for weights, run in runs.items():
            if "tokens_per_s" in run:
                out[f"{weights}_fraction_of_optimal"] = run["tokens_per_s"] / optimal
    return out


def targets(record: dict[str, Any]) -> list[dict[str, Any]]:
    """The issue's target rows from what this run measured (a failed section gives none)."""
    kernels = (record.get("kernels") or {}).get("tokens", {}).get("2048", {})
    runs = (record.get("throughput") or {}).get("runs", {})
    measured = {
        "grouped_gemm_frac_of_dense_2048": kernels.get("grouped", {}).get("frac_of_dense_gemm"),
        "mixtral_bf16_fraction_of_optimal": (record.get("throughput") or {}).get(
            "bf16_fraction_of_optimal"
        ),
        "mixtral_fp8_tokens_per_s": runs.get("fp8", {}).get("tokens_per_s"),
    }
    return target_rows(measured, TARGETS)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_out_argument(parser)
    parser.add_argument("--sections", default="kernels,graphs,throughput")
    parser.add_argument("--num-prompts", type=int, default=2000 if GPU else 4)
    parser.add_argument(
        "--run-timeout", type=float, default=330.0,
        help="seconds one offline run may take before it is recorded as failed",
    )  # fmt: skip
    args = parser.parse_args(argv)
    tiny = not GPU
    sections = set(args.sections.split(","))
    started = time.perf_counter()
    env = environment(DEVICE)
    record: dict[str, Any] = {
        **env,
        "experiment": "moe",
        "device": env.get("gpu") or "cpu",
        "dry_run": tiny,
        "command": " ".join(["python", *sys.argv]),
        "commit": commit(),
    }
    if GPU:
        record["gemm_tflops"] = gemm_ceiling_tflops(DEVICE)
        record["copy_gbs"] = copy_bandwidth_gbs(DEVICE)
    gemm, copy = record.get("gemm_tflops"), record.get("copy_gbs")
    runs: dict[str, Callable[[], dict[str, Any]]] = {
        "kernels": lambda: kernel_section(tiny, gemm, copy),
        "graphs": lambda: graphs_section(tiny),
        "throughput": lambda: throughput_section(args, tiny, gemm),
    }
    for name, run in runs.items():
        if name not in sections:
            continue
        try:
            record[name] = run()
        except Exception as exc:  # one GPU call: a failed section must not lose the others
            print(f"section {name} failed: {exc!r}", file=sys.stderr, flush=True)
            record[name] = {"error": repr(exc), "checks_ok": False}
        if GPU:
            torch.cuda.empty_cache()
    record["total_seconds"] = time.perf_counter() - started
    label = "dry-run" if tiny else f"{MODEL}-grouped"
    print(write_json(result_path(args.out, env.get("gpu"), "moe", label), record))
    if GPU:
        write_targets(args.out, "moe", record, targets(record))
    return 0 if all(record.get(s, {}).get("checks_ok", True) for s in sections) else 1


if __name__ == "__main__":
    sys.exit(main())
