"""How far FP8 (W8A8) weights move a model from its unquantized self, measured in one run.

The same model is built twice, unquantized (the engine's dtype: float32 on a CPU, bfloat16 on a
GPU) and with ``quantization="fp8"``, and each is asked for:

* the logits of every position of a fixed token stream (one prefill), from which the relative
  error of the FP8 logits against the unquantized ones (Frobenius norm over all positions) and
  the perplexity of each on the stream's next tokens;
* greedy continuations of ``--steps`` tokens for ``--prompts`` prompts cut from the stream, from
  which the greedy agreement (the fraction of positions with the same token) and the mean step
  of the first divergence.

The stream is a fixed English text through the model's tokenizer, or seeded random ids for a
model without one (dummy registry weights, e.g. the 8B shapes on a GPU).

Random weights are a weak stand-in for a trained model: how much a perturbation grows through
the layers depends on their scale, so ``--random-llama STD`` builds a small random Llama
(transformers' ``LlamaForCausalLM``, seeded, weights drawn from N(0, STD)) to show that range.

Usage: python experiments/fp8_accuracy.py [--model builtin] [--device cpu] [--label L] [--out DIR]
       python experiments/fp8_accuracy.py --random-llama 0.2
       python experiments/fp8_accuracy.py --model llama-3-8b --load-format dummy --device cuda
"""

from __future__ import annotations

import argparse
import gc
import math
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch
from common import add_out_argument, write_result

from nanoflow import LLM, SamplingParams
from nanoflow.engine.sequence import Sequence
from nanoflow.measure import environment

TEXT = (
    "The engine splits each batch into nano-batches and overlaps compute, memory and network "
    "work. Large language models generate text one token at a time; serving many requests at "
    "once keeps the GPU busy. A paged cache stores keys and values in fixed-size blocks. The "
    "quick brown fox jumps over the lazy dog. Hello, world! How are you today? I am fine, thank "
    "you. Once upon a time there was a small model that lived on a laptop and answered every "
    "question with great enthusiasm. "
)


def token_stream(llm: LLM, length: int, vocab_size: int, seed: int) -> tuple[list[int], str]:
    """``length`` ids and what they are: the text (repeated) through the tokenizer, else seeded
    random ids."""
    if llm.tokenizer is not None:
        ids = llm.encode(TEXT)
        return (ids * (length // len(ids) + 1))[:length], "text"
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab_size, (length,), generator=gen).tolist(), "random ids"


@torch.inference_mode()
def stream_logits(llm: LLM, ids: list[int]) -> torch.Tensor:
    """Float32 logits of every position of ``ids``, from one prefill of the whole stream."""
    engine = llm.engine
    runner = engine.runner
    seq: Sequence = engine.add_request("stream", ids, SamplingParams(max_tokens=1))
    plan = engine.scheduler.plan()
    if len(plan.chunks) != 1 or plan.chunks[0].num_tokens != len(ids):
        raise SystemExit(f"the stream of {len(ids)} tokens does not fit one step; shorten it")
    step = runner.prepare(plan)
    runner.model.embed(step.input_ids, runner.buffers)
    runner.executor.run(runner.model.layer_ops, runner.buffers, step.nano_batches)
    rows = torch.arange(len(ids), device=runner.device)
    logits = runner.model.logits(runner.buffers, rows).cpu()
    engine.scheduler.commit(plan)
    engine.abort_request(seq.request_id)
    return logits


def greedy(llm: LLM, prompts: list[list[int]], steps: int) -> list[list[int]]:
    params = SamplingParams(max_tokens=steps, temperature=0.0, ignore_eos=True)
    return [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]


def perplexity(logits: torch.Tensor, ids: list[int]) -> float:
    targets = torch.tensor(ids[1:])
    nll = torch.nn.functional.cross_entropy(logits[:-1].float(), targets)
    return math.exp(nll.item())


def run_model(args: argparse.Namespace, quantization: str | None) -> dict[str, Any]:
    llm = LLM(
        args.model,
        load_format=args.load_format,
        device=args.device,
        quantization=quantization,
        max_num_batched_tokens=max(args.stream_len, 256),
        cuda_graphs=False,
        gpu_memory_utilization=args.gpu_memory_utilization,
    )
    spec = llm.engine.runner.spec
    ids, kind = token_stream(llm, args.stream_len, spec.vocab_size, args.seed)
    logits = stream_logits(llm, ids)
    starts = [i * (args.stream_len // args.prompts) for i in range(args.prompts)]
    prompts = [ids[s : s + args.prompt_len] for s in starts]
    out = {
        "ids": ids,
        "stream": kind,
        "logits": logits,
        "greedy": greedy(llm, prompts, args.steps),
        "dtype": str(llm.engine.runner.dtype).removeprefix("torch."),
        "spec": spec,
    }
    llm.engine.shutdown()
    del llm
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return out


def compare(base: dict[str, Any], fp8: dict[str, Any], steps: int) -> dict[str, Any]:
    ref, got = base["logits"], fp8["logits"]
    row_err = (got - ref).norm(dim=-1) / ref.norm(dim=-1)
    pairs = list(zip(base["greedy"], fp8["greedy"], strict=True))
    same = sum(a == b for r, f in pairs for a, b in zip(r, f, strict=True))
    first = [next((i for i, (a, b) in enumerate(zip(r, f, strict=True)) if a != b), steps)
             for r, f in pairs]  # fmt: skip
    return {
        "logits_rel_err": ((got - ref).norm() / ref.norm()).item(),
        "logits_rel_err_max_position": row_err.max().item(),
        "top1_agreement_on_stream": (got.argmax(-1) == ref.argmax(-1)).float().mean().item(),
        "greedy_agreement": same / (len(pairs) * steps),
        "greedy_identical_prompts": sum(r == f for r, f in pairs),
        "mean_first_divergence_step": sum(first) / len(first),
        "perplexity_reference": perplexity(ref, base["ids"]),
        "perplexity_fp8": perplexity(got, fp8["ids"]),
    }


def random_llama(folder: Path, std: float, seed: int) -> None:
    """A 4-layer Llama (hidden 256, GQA 8/4 heads, vocabulary 1024) of N(0, ``std``) weights."""
    import transformers

    config = transformers.LlamaConfig(
        vocab_size=1024, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
        num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=2048,
    )  # fmt: skip
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.fill_(1.0)
            else:
                p.normal_(0.0, std)
    model.save_pretrained(folder)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="builtin")
    parser.add_argument("--load-format", default="auto", choices=("auto", "safetensors", "dummy"))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--stream-len", type=int, default=512)
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--prompt-len", type=int, default=16)
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.45)
    parser.add_argument("--random-llama", type=float, default=None, metavar="STD")
    parser.add_argument("--label", default=None)
    add_out_argument(parser)
    args = parser.parse_args(argv)
    if args.random_llama is not None:
        with tempfile.TemporaryDirectory() as folder:
            random_llama(Path(folder), args.random_llama, args.seed)
            args.model = folder
            args.label = args.label or f"random-llama-std{args.random_llama:g}"
            return measure(args, f"random Llama, N(0, {args.random_llama:g}) weights")
    return measure(args, args.model)


def measure(args: argparse.Namespace, model: str) -> dict[str, Any]:
    base = run_model(args, None)
    fp8 = run_model(args, "fp8")
    if base["ids"] != fp8["ids"]:
        raise SystemExit("the two runs read different token streams")
    metrics = compare(base, fp8, args.steps)
    env = environment(torch.device(args.device))
    spec = base["spec"]
    record = {
        "device": env.get("gpu") or "cpu",
        "model": model,
        "load_format": args.load_format,
        "shapes": {"hidden": spec.hidden_size, "layers": spec.num_layers, "vocab": spec.vocab_size},
        "reference_dtype": base["dtype"],
        "stream_tokens": args.stream_len,
        "stream": base["stream"],
        "greedy_prompts": args.prompts,
        "greedy_steps": args.steps,
        **metrics,
        "env": env,
    }
    label = args.label or f"{args.model.replace('/', '_')}-{args.load_format}"
    path = write_result(args.out, "fp8_accuracy", label, record)
    for key, value in metrics.items():
        print(f"{key:32s} {value:.4f}" if isinstance(value, float) else f"{key:32s} {value}")
    print(f"wrote {path}", file=sys.stderr)
    return record


if __name__ == "__main__":
    main()
