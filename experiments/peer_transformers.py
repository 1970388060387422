"""Peer baseline: Hugging Face transformers' own batched generation, on the same GPU, model shapes
(random bf16 weights of a registry architecture) and workload as ``nanoflow bench throughput``, so
the README compares nanoflow with a widely used engine and not only with its own ablations.

Two modes, each reported as input + output tokens/s (the paper's offline metric):
- ``static``: ``model.generate`` on fixed batches of B prompts (the largest B of --batch-sizes whose
  weights + KV cache + prefill activations fit), EOS ignored (min_new_tokens = max_new_tokens);
- ``continuous``: ``model.generate_batch`` (transformers' continuous batching, ≥ 4.56) where the
  installed version has it, on --continuous-prompts prompts (it is slow: bounded to keep the run
  short); its time is from the first request scheduled to the last finished.

Usage: python experiments/peer_transformers.py [--model llama-3-8b] [--workload 512/512]
           [--num-prompts 256] [--batch-sizes 256,128,64] [--out DIR | --output-json PATH]
       python experiments/peer_transformers.py --model tiny --device cpu --num-prompts 8 \
           --workload 32/8   (a CPU dry run)
"""

from __future__ import annotations

import argparse
import inspect
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import torch
import transformers
from common import add_out_argument, write_json, write_result

from nanoflow.errors import ConfigError
from nanoflow.measure import environment
from nanoflow.models.builtin import BUILTIN_SPEC
from nanoflow.models.registry import get_known_model
from nanoflow.models.spec import ModelSpec
from nanoflow.workloads import load_workload, random_prompts


def build_model(spec: ModelSpec, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """Random weights made directly on ``device``: an 8B model in bf16 takes seconds, no disk."""
    hf = dict(spec.to_hf_config())
    hf.pop("architectures")
    cfg = transformers.AutoConfig.for_model(hf.pop("model_type"), **hf)
    with torch.device(device):
        model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    return model.eval()


def fits(spec: ModelSpec, batch: int, in_len: int, out_len: int, device: torch.device) -> bool:
    """Whether weights, the batch's full KV cache and its prefill activations fit in free memory;
    HF's cache grows by concatenation, so a batch that does not fit fails only near its end."""
    if device.type != "cuda":
        return True
    free, _ = torch.cuda.mem_get_info(device)
    kv = batch * (in_len + out_len) * spec.kv_bytes_per_token(2)
    prefill = batch * in_len * (spec.intermediate_size * 3 + spec.hidden_size * 4) * 2
    return kv + prefill < 0.85 * free


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_static(
    model: torch.nn.Module, prompts: torch.Tensor, out_len: int, batch: int, deadline: float
) -> dict[str, Any]:
    """Whole batches one after another; stops starting batches past ``deadline``."""
    device = prompts.device

    def generate(ids: torch.Tensor, n: int) -> torch.Tensor:
        return model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=n,
            min_new_tokens=n,
            do_sample=False,
            pad_token_id=0,
        )

    generate(prompts[: min(batch, 4)], 4)
    sync(device)
    started = time.perf_counter()
    num_in = num_out = done = 0
    while done < len(prompts) and (done == 0 or time.perf_counter() < deadline):
        ids = prompts[done : done + batch]
        out = generate(ids, out_len)
        num_in += ids.numel()
        num_out += out.shape[0] * (out.shape[1] - ids.shape[1])
        done += len(ids)
    sync(device)
    elapsed = time.perf_counter() - started
    return {
        "batch_size": batch,
        "num_prompts": done,
        "elapsed_s": elapsed,
        "input_tokens": num_in,
        "output_tokens": num_out,
        "tokens_per_s": (num_in + num_out) / elapsed,
        "output_tokens_per_s": num_out / elapsed,
    }


def run_continuous(
    model: torch.nn.Module, prompts: list[list[int]], out_len: int, small: bool
) -> dict[str, Any]:
    """transformers' continuous batching with its own defaults on a GPU (memory, CUDA graphs);
    ``small`` caps the KV cache so a CPU dry run does not size it from host memory."""
    gen = transformers.GenerationConfig(max_new_tokens=out_len, do_sample=False, eos_token_id=None)
    kwargs: dict[str, Any] = {}
    if "continuous_batching_config" in inspect.signature(model.generate_batch).parameters:
        from transformers.generation.configuration_utils import ContinuousBatchingConfig

        small_cache = dict(num_blocks=64, max_batch_tokens=256, page_size=16, use_cuda_graph=False)
        kwargs["continuous_batching_config"] = ContinuousBatchingConfig(
            **(small_cache if small else {})
        )
    elif small:  # releases before ContinuousBatchingConfig read these from the generation config
        gen.update(num_blocks=64, max_batch_tokens=256, block_size=16)
    started = time.perf_counter()
    outputs = model.generate_batch(inputs=prompts, generation_config=gen, **kwargs)
    wall = time.perf_counter() - started
    spans = [o.lifespan for o in outputs.values() if min(getattr(o, "lifespan", (-1, -1))) > 0]
    span = max(e for _, e in spans) - min(s for s, _ in spans) if spans else wall
    num_in = sum(len(p) for p in prompts)
    num_out = sum(len(o.generated_tokens) for o in outputs.values())
    return {
        "num_prompts": len(prompts),
        "wall_s": wall,
        "elapsed_s": span,
        "input_tokens": num_in,
        "output_tokens": num_out,
        "short_requests": sum(len(o.generated_tokens) < out_len for o in outputs.values()),
        "errors": sum(o.error is not None for o in outputs.values()),
        "tokens_per_s": (num_in + num_out) / span,
        "output_tokens_per_s": num_out / span,
    }


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="llama-3-8b", help="registry name, or 'tiny' (dry run)")
    p.add_argument("--workload", default="512/512", help="constant IN/OUT lengths")
    p.add_argument("--num-prompts", type=int, default=256)
    p.add_argument("--batch-sizes", default="256,128,64", help="tried largest first")
    p.add_argument("--modes", default="static,continuous")
    p.add_argument(
        "--continuous-prompts",
        type=int,
        default=64,
        help="prompts for continuous mode (slow in transformers 5.17: bounded)",
    )
    p.add_argument("--time-budget-s", type=float, default=150.0, help="per mode, soft")
    p.add_argument("--device", default="auto")
    p.add_argument("--seed", type=int, default=0)
    add_out_argument(p)
    p.add_argument("--output-json", type=Path, default=None, help="this file instead of --out's")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(args.device)
    spec = BUILTIN_SPEC if args.model == "tiny" else get_known_model(args.model)
    requests = load_workload(args.workload, args.num_prompts, args.seed)
    in_len, out_len = requests[0].input_len, requests[0].output_len
    if any((r.input_len, r.output_len) != (in_len, out_len) for r in requests):
        raise ConfigError("the transformers peer takes constant IN/OUT workloads only")
    prompts = random_prompts(requests, spec.vocab_size, args.seed)
    torch.manual_seed(args.seed)
    model = build_model(spec, device, torch.bfloat16 if device.type == "cuda" else torch.float32)
    result: dict[str, Any] = {}
    modes = args.modes.split(",")
    if "static" in modes:
        sizes = sorted((int(b) for b in args.batch_sizes.split(",")), reverse=True)
        fitting = [b for b in sizes if fits(spec, b, in_len, out_len, device)] or sizes[-1:]
        ids = torch.tensor(prompts, device=device)
        for batch in fitting:
            deadline = time.perf_counter() + args.time_budget_s
            try:
                result["static"] = run_static(model, ids, out_len, batch, deadline)
                break
            except torch.OutOfMemoryError:
                result["static"] = {"batch_size": batch, "error": traceback.format_exc(limit=2)}
                torch.cuda.empty_cache()
    if "continuous" in modes:
        if hasattr(model, "generate_batch"):
            try:
                subset = prompts[: args.continuous_prompts]
                result["continuous"] = run_continuous(model, subset, out_len, args.model == "tiny")
            except Exception:  # a peer's failure is a result to report, not a crash of the run
                result["continuous"] = {"error": traceback.format_exc(limit=3)}
        else:
            result["continuous"] = {
                "error": f"transformers {transformers.__version__} has no generate_batch"
            }
    record = {
        **environment(device),
        "experiment": "peer_transformers",
        "model": args.model,
        "workload": args.workload,
        "num_prompts": len(prompts),
        "result": result,
    }
    if args.output_json:
        write_json(args.output_json, record)
    else:
        print(write_result(args.out, "peer_transformers", args.model, record))
    for mode, r in result.items():
        status = (
            f"{r['tokens_per_s']:.1f} tokens/s"
            if "tokens_per_s" in r
            else f"failed: {r['error'].strip().splitlines()[-1]}"
        )
        print(f"transformers {mode}: {status}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
