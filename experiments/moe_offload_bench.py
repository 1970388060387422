"""GPU run for Mixtral (MoE) in the pipeline and for weight offload, one mode per call.

MoE mode (an H200): mixtral-8x7b with dummy bf16 weights.
  1. The fused MoE kernel on Mixtral's shapes: bf16 error against the reference and achieved
     TFLOP/s (active FLOPs) at decode- and prefill-sized batches.
  2. Offline 512/512 throughput, sequential vs overlapped schedule, greedy tokens of the two
     compared, and each as a fraction of the optimal throughput counted with ACTIVE parameters.

Offload mode (``--offload``, an H100): llama-2-70b with dummy bf16 weights (~138 GB, more than
the GPU holds), the layers that do not fit kept in pinned host memory and streamed in.
  1. Offload on vs off on a small model: identical greedy tokens (the copy stream and events).
  2. The pinned host-to-device copy rate, measured on the engine's own buffers.
  3. A short offline generation, its throughput against the copy bound (GB/s -> offloaded layers
     per second -> iterations per second -> tokens/s for the batch it ran), and its greedy
     tokens under the sequential and overlapped schedules compared.

Usage:
  python experiments/moe_offload_bench.py [--out DIR] [--num-prompts N]
  python experiments/moe_offload_bench.py --offload [--out DIR]
  python experiments/moe_offload_bench.py [--offload] --device cpu --model tiny ...  (a dry run)
Writes DIR/<gpu>/moe/<model>.json or DIR/<gpu>/offload/<model>.json.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch
from common import add_out_argument, write_result

from nanoflow import LLM, SamplingParams
from nanoflow.engine.schedule_select import architecture_schedule
from nanoflow.measure import (
    environment,
    gemm_ceiling_tflops,
    optimal_throughput,
    time_cuda,
    token_agreement,
)
from nanoflow.runtime.schedule import sequential_schedule
from nanoflow.workloads import constant, random_prompts

DEVICE = torch.device("cuda:0")


def sync() -> None:
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


def seconds(fn, iters: int = 5) -> float:
    """Median seconds of ``fn``: CUDA events on a GPU, the host clock on CPU."""
    if DEVICE.type == "cuda":
        return time_cuda(fn, iters=iters, warmup=1)
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def tiny_checkpoint(moe: bool) -> str:
    """A small random transformers checkpoint (Mixtral or Llama) for dry runs and parity."""
    import transformers

    shape = dict(
        vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
        bos_token_id=1, eos_token_id=2,
    )  # fmt: skip
    if moe:
        cfg = transformers.MixtralConfig(**shape, num_local_experts=4, num_experts_per_tok=2)
    else:
        cfg = transformers.LlamaConfig(**shape)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.1)
    folder = tempfile.mkdtemp(prefix="nanoflow-tiny-")
    model.save_pretrained(folder)
    return folder


def make_llm(model: str, args: argparse.Namespace, moe: bool, **kwargs) -> LLM:
    if model == "tiny":
        model, load_format = tiny_checkpoint(moe), "auto"
    else:
        load_format = "dummy"
    return LLM(
        model,
        load_format=load_format,
        device=str(DEVICE),
        max_num_batched_tokens=args.budget,
        num_kv_blocks=args.num_kv_blocks,
        **kwargs,
    )


def greedy(llm: LLM, num: int, length: int, seed: int = 2) -> list[list[int]]:
    prompts = random_prompts(constant(length, 1, num), llm.engine.spec.vocab_size, seed=seed)
    params = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)
    return [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]


def offline(llm: LLM, num_prompts: int, in_len: int, out_len: int) -> dict:
    """Offline throughput (input + output tokens per second), with the iterations it took."""
    requests = constant(in_len, out_len, num_prompts)
    prompts = random_prompts(requests, llm.engine.spec.vocab_size, seed=1)
    params = SamplingParams(max_tokens=out_len, temperature=0.0, ignore_eos=True)
    iterations: list[int] = []
    llm.engine.runner.on_plan = lambda plan: iterations.append(plan.num_tokens)
    sync()
    start = time.perf_counter()
    llm.generate(prompts, params, use_tqdm=False)
    sync()
    elapsed = time.perf_counter() - start
    llm.engine.runner.on_plan = None
    return {
        "num_prompts": num_prompts,
        "input_len": in_len,
        "output_len": out_len,
        "elapsed_s": elapsed,
        "iterations": len(iterations),
        "tokens_per_iteration": sum(iterations) / max(1, len(iterations)),
        "tokens_per_s": num_prompts * (in_len + out_len) / elapsed,
    }


def schedules(llm: LLM) -> dict:
    """The sequential executor and the overlapped schedule ``--executor overlapped`` uses."""
    overlapped = architecture_schedule(llm.engine.config, DEVICE)
    return {"sequential": sequential_schedule(), "overlapped": overlapped}


def fused_moe_kernel(spec) -> list[dict]:
    """The fused MoE kernel on the model's expert shapes: error vs the reference, TFLOP/s."""
    from nanoflow import kernels
    from nanoflow.kernels import moe

    dtype = torch.bfloat16 if DEVICE.type == "cuda" else torch.float32
    e, k, h, i = (
        spec.num_experts,
        spec.num_experts_per_token,
        spec.hidden_size,
        spec.intermediate_size,
    )
    w13 = torch.randn(e, 2 * i, h, device=DEVICE, dtype=dtype) * h**-0.5
    w2 = torch.randn(e, h, i, device=DEVICE, dtype=dtype) * i**-0.5
    rows = []
    for tokens in (64, 512, 2048):
        x = torch.randn(tokens, h, device=DEVICE, dtype=dtype)
        probs = torch.softmax(torch.randn(tokens, e, device=DEVICE), -1)
        weights, ids = torch.topk(probs, k, -1)
        weights /= weights.sum(-1, keepdim=True)
        got = kernels.fused_moe(x, w13, w2, weights, ids)
        want = moe.fused_moe_ref(x, w13, w2, weights, ids)
        t = seconds(lambda x=x, w=weights, d=ids: kernels.fused_moe(x, w13, w2, w, d))
        flops = 2 * tokens * k * 3 * h * i
        rows.append({
            "tokens": tokens,
            "ms": t * 1e3,
            "tflops": flops / t / 1e12,
            "rel_err_vs_ref": ((got.float() - want.float()).norm() / want.float().norm()).item(),
        })  # fmt: skip
        print("fused_moe", json.dumps(rows[-1]), flush=True)
    return rows


def moe_mode(args: argparse.Namespace, record: dict) -> None:
    llm = make_llm(args.model, args, moe=True)
    spec = llm.engine.spec
    record["kernel"] = fused_moe_kernel(spec)
    optimal = (
        optimal_throughput(spec, record["gemm_tflops"] * 1e12) if "gemm_tflops" in record else None
    )
    record.update(
        num_kv_blocks=llm.engine.runner.num_blocks,
        params_per_token=spec.params_per_token(),
        optimal_tokens_per_s=optimal,
        schedules={},
    )
    reference = None
    for name, schedule in schedules(llm).items():
        row: dict = {"schedule": schedule.to_dict()}
        try:
            llm.engine.runner.set_schedule(schedule)
            tokens = greedy(llm, 16, 64)
            reference = reference or tokens
            row["greedy_16_identical_to_sequential"] = token_agreement(tokens, reference)
            row["offline"] = offline(llm, args.num_prompts, args.input_len, args.output_len)
            if optimal:
                row["fraction_of_optimal"] = row["offline"]["tokens_per_s"] / optimal
        except Exception as exc:  # record and go on with the other schedule
            row["error"] = f"{type(exc).__name__}: {exc}"
            traceback.print_exc()
        record["schedules"][name] = row
        print(name, json.dumps({k: v for k, v in row.items() if k != "schedule"}), flush=True)


def h2d_gbs(plan) -> float:
    """Pinned host-to-device rate of one offloaded layer into its slot (the engine's buffers)."""
    src = plan.host[0]
    dst = plan.slots[0][: src.numel()]
    return src.numel() / seconds(lambda: dst.copy_(src, non_blocking=True)) / 1e9


def offload_parity(args: argparse.Namespace) -> dict:
    """Offload on vs off on a small checkpoint: the same greedy tokens on this device."""
    folder = tiny_checkpoint(moe=False)
    tokens = []
    for kwargs in ({}, {"offload_weights": "cpu", "offload_fraction": 0.5}):
        llm = LLM(folder, device=str(DEVICE), num_kv_blocks=256, **kwargs)
        tokens.append(greedy(llm, 8, 40))
        del llm
    gc.collect()
    if DEVICE.type == "cuda":  # give the memory back, so the big model's offload plan sees it
        torch.cuda.empty_cache()
    return {"prompts": 8, "greedy_identical": sum(a == b for a, b in zip(*tokens, strict=True))}


def offload_mode(args: argparse.Namespace, record: dict) -> None:
    record["parity"] = offload_parity(args)
    print("parity", record["parity"], flush=True)
    start = time.perf_counter()
    llm = make_llm(
        args.model, args, moe=False, offload_weights="cpu", offload_fraction=args.offload_fraction
    )
    record["load_s"] = time.perf_counter() - start
    plan = llm.engine.runner.offload
    if plan is None:
        raise RuntimeError("every layer fits on this GPU: pass --offload-fraction to offload some")
    layer = plan.host[0].numel()
    gbs = h2d_gbs(plan)
    copy_s = len(plan.host_layers) * layer / (gbs * 1e9)  # per iteration, all offloaded layers
    record.update(
        num_layers=llm.engine.spec.num_layers,
        offloaded_layers=list(plan.host_layers),
        layer_gb=layer / 1e9,
        h2d_gbs=gbs,
        offloaded_layers_per_s=gbs * 1e9 / layer,
        copy_s_per_iteration=copy_s,
        num_kv_blocks=llm.engine.runner.num_blocks,
        budget_tokens_per_s_bound=args.budget / copy_s,
    )
    print("h2d", gbs, "GB/s;", len(plan.host_layers), "offloaded layers", flush=True)
    runs = {}
    reference = None
    for name, schedule in schedules(llm).items():
        llm.engine.runner.set_schedule(schedule)
        tokens = greedy(llm, 4, 32)
        reference = reference or tokens
        run = offline(llm, args.num_prompts, args.input_len, args.output_len)
        run["greedy_identical_to_sequential"] = tokens == reference
        run["tokens_per_s_bound"] = run["tokens_per_iteration"] / copy_s
        run["fraction_of_bound"] = run["tokens_per_s"] / run["tokens_per_s_bound"]
        runs[name] = run
        print(name, json.dumps(run), flush=True)
    record["offline"] = runs


def main() -> int:
    global DEVICE
    parser = argparse.ArgumentParser(description=__doc__)
    add_out_argument(parser)
    parser.add_argument("--offload", action="store_true", help="the weight-offload mode")
    parser.add_argument("--model", default=None, help="registry name, or 'tiny' for a dry run")
    parser.add_argument("--device", default="cuda:0")
    parser.add_argument("--num-prompts", type=int, default=None)
    parser.add_argument("--input-len", type=int, default=None)
    parser.add_argument("--output-len", type=int, default=None)
    parser.add_argument("--budget", type=int, default=None, help="token budget per iteration")
    parser.add_argument("--num-kv-blocks", type=int, default=None)
    parser.add_argument(
        "--offload-fraction", type=float, default=None, help="default: from free GPU memory"
    )
    args = parser.parse_args()
    defaults = (("llama-2-70b", 32, 256, 16, 4096) if args.offload
                else ("mixtral-8x7b", 256, 512, 512, 2048))  # fmt: skip
    for key, value in zip(("model", "num_prompts", "input_len", "output_len", "budget"), defaults,
                          strict=True):  # fmt: skip
        if getattr(args, key) is None:
            setattr(args, key, value)
    DEVICE = torch.device(args.device)
    mode = "offload" if args.offload else "moe"
    record = {**environment(DEVICE), "mode": mode}
    record.update(args=vars(args))
    if DEVICE.type == "cuda":
        record["gemm_tflops"] = gemm_ceiling_tflops(DEVICE)
    started = time.perf_counter()
    try:
        (offload_mode if args.offload else moe_mode)(args, record)
    except Exception as exc:
        record["error"] = f"{type(exc).__name__}: {exc}"
        traceback.print_exc()
    record["seconds"] = time.perf_counter() - started
    print(write_result(args.out, mode, Path(args.model).name, record))
    print(json.dumps({k: v for k, v in record.items() if k not in ("kernel",)}, default=str)[:3000])
    return 1 if "error" in record else 0


if __name__ == "__main__":
    sys.exit(main())
