"""fp8-cache decode attention with e4m3 score MMAs against K widened to fp16, in one GPU call.

The CUDA decode kernel widens every fp8 K and V element to fp16 before its MMAs; on few SMs
that conversion, not HBM, may bound it. With ``fp8_scores`` the scores come from e4m3 MMAs on
the raw K bytes, against the queries quantized per head to e4m3 once an item: one e4m3 term of
them (1) or two, the second their rounding residual (2). This measures the three on the shapes
of the memory-unit script at CTA budgets of k SMs: milliseconds, GB/s of K/V read, and the
relative error of each against the PyTorch reference and against a PyTorch model of its
arithmetic. Without a GPU it measures only what quantizing the queries costs in accuracy.

Writes DIR/<gpu>/kernels/decode-fp8-scores.json (DIR defaulting to experiments/results).

Usage: python experiments/decode_fp8_scores.py [--budgets 16,24,32,48,66,132] [--out DIR]
"""

from __future__ import annotations

import argparse
import dataclasses
import sys

import torch
from common import add_out_argument, write_result

from nanoflow.kernels import decode_attention_cuda as cuda_kernel
from nanoflow.kernels.decode_attention import _launch_decode_cuda, paged_decode_attention_ref
from nanoflow.measure import environment, time_cuda

SHAPES = ((64, 8192), (256, 2048), (1024, 512), (1024, 256))  # (batch, context)
KV_HEADS, HEADS, HEAD_DIM, PAGE, SCALE = 8, 32, 128, 16, 128**-0.5
E4M3_MAX = 448.0
TERMS = (1, 2)  # e4m3 terms of the queries in the fp8-score variants


def paged_inputs(batch: int, context: int, device: str, seed: int) -> tuple[torch.Tensor, ...]:
    """Random queries, fp8 caches and shuffled block tables, every row ``context`` long."""
    gen = torch.Generator(device=device).manual_seed(seed)
    pages = -(-context // PAGE)
    total = batch * pages
    shape = (total, KV_HEADS, PAGE, HEAD_DIM)
    k = torch.randn(shape, device=device, generator=gen).to(torch.float8_e4m3fn)
    v = torch.randn(shape, device=device, generator=gen).to(torch.float8_e4m3fn)
    tables = torch.randperm(total, device=device, generator=gen).to(torch.int32).view(batch, pages)
    q = torch.randn(batch, HEADS, HEAD_DIM, device=device, generator=gen).to(torch.bfloat16)
    lens = torch.full((batch,), context, dtype=torch.int32, device=device)
    return q, k, v, tables, lens


def _e4m3_term(x: torch.Tensor) -> torch.Tensor:
    """``x`` scaled per head to e4m3's range, rounded to e4m3, scaled back."""
    amax = x.abs().amax(dim=-1, keepdim=True)
    scale = torch.where(amax > 0, amax / E4M3_MAX, torch.ones_like(amax))
    return (x / scale).to(torch.float8_e4m3fn).float() * scale


def quantized_queries(q: torch.Tensor, terms: int) -> torch.Tensor:
    """What the kernel's scores see of ``q`` with ``terms`` e4m3 terms (the second the first's
    rounding residual), in fp32."""
    first = _e4m3_term(q.float())
    return first if terms == 1 else first + _e4m3_term(q.float() - first)


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.float() - ref.float()).norm() / ref.float().norm()).item()


def kv_bytes(batch: int, context: int) -> int:
    return 2 * batch * context * KV_HEADS * HEAD_DIM  # K and V, one byte an element


def measure_shape(batch: int, context: int, budgets: list[int], device: str) -> dict:
    inputs = paged_inputs(batch, context, device, seed=batch + context)
    q = inputs[0]
    ref_fp32 = paged_decode_attention_ref(q.float(), *inputs[1:], SCALE)
    models = {terms: paged_decode_attention_ref(quantized_queries(q, terms), *inputs[1:], SCALE)
              for terms in TERMS}  # fmt: skip
    row = {"batch": batch, "context": context,
           "model_rel_err_vs_ref": {t: rel_err(m, ref_fp32) for t, m in models.items()},
           "budgets": {}}  # fmt: skip
    if device != "cuda":
        return row
    for sms in budgets:
        widened = cuda_kernel.default_config(1, HEADS // KV_HEADS, sms)
        cell = {}
        for terms in (0, *TERMS):
            config = dataclasses.replace(widened, fp8_scores=terms)
            out = torch.full_like(q, float("nan"))

            def run(config: cuda_kernel.CudaDecodeConfig = config, out: torch.Tensor = out,
                    sms: int = sms) -> None:  # fmt: skip
                _launch_decode_cuda(*inputs, SCALE, sms, out, config)

            run()
            torch.cuda.synchronize()
            seconds = time_cuda(run, iters=20, warmup=3, flush_l2=True)
            model = models[terms] if terms else ref_fp32
            cell[f"terms_{terms}"] = {
                "ms": 1e3 * seconds, "gbs": kv_bytes(batch, context) / seconds / 1e9,
                "rel_err_vs_ref": rel_err(out, ref_fp32), "rel_err_vs_model": rel_err(out, model),
                "finite": bool(torch.isfinite(out).all()),
            }  # fmt: skip
        for terms in TERMS:
            cell[f"speedup_{terms}"] = cell["terms_0"]["ms"] / cell[f"terms_{terms}"]["ms"]
        row["budgets"][str(sms)] = cell
    return row


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--budgets", default="16,24,32,48,66,132",
                   help="CTA budgets (one CTA per SM) to time each kernel at")  # fmt: skip
    add_out_argument(p)
    args = p.parse_args(argv)
    gpu = torch.cuda.is_available() and cuda_kernel.available(torch.device("cuda"))
    device = "cuda" if gpu else "cpu"
    budgets = [int(b) for b in args.budgets.split(",")]
    shapes = SHAPES if gpu else ((4, 300), (2, 1000))
    rows = [measure_shape(batch, context, budgets, device) for batch, context in shapes]
    record = {**environment(torch.device(device)), "args": vars(args) | {"out": str(args.out)},
              "rows": rows}  # fmt: skip
    path = write_result(args.out, "kernels", "decode-fp8-scores", record, " ".join(sys.argv))
    print(f"wrote {path}")
    for row in rows:
        errs = ", ".join(f"{t} terms {e:.4f}" for t, e in row["model_rel_err_vs_ref"].items())
        print(f"b{row['batch']} ctx{row['context']}: modelled error {errs}")
        for sms, cell in row["budgets"].items():
            rates = " / ".join(f"{cell[f'terms_{t}']['gbs']:.0f}" for t in (0, *TERMS))
            errors = " / ".join(f"{cell[f'terms_{t}']['rel_err_vs_ref']:.4f}" for t in (0, *TERMS))
            print(f"  {sms:>4} SMs: GB/s widened / 1 / 2 terms {rates}; error {errors}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
