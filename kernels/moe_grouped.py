"""Mixture-of-experts MLP on grouped GEMMs: ``torch._grouped_mm`` (CUTLASS on Hopper) for bf16
experts, its row-scaled e4m3 twin ``torch._scaled_grouped_mm`` for FP8 experts.

The fused Triton kernel of ``moe.py`` reaches about a quarter of the dense GEMM rate; a grouped
GEMM runs each expert's segment at nearly the rate of a dense GEMM of that size. Around the two
GEMMs there are only memory-bound passes, each one read of its input:

1. route: the (token, choice) pairs sorted by expert into a padded layout, each expert's
   segment starting at a multiple of ``ALIGN`` rows (the alignment the grouped GEMM's tiles
   want); padding rows copy token 0, so every row holds finite values;
2. gather the token rows into that layout (for FP8, the tokens are quantized first, once per
   token, and the e4m3 rows and their scales are gathered);
3. gate-up GEMM, SiLU-and-mul (quantizing for FP8 in the same pass), down GEMM;
4. combine: one kernel gathers each token's ``top_k`` rows and sums them, weighted, in fp32.

Every shape depends on the token count only and nothing is read back to the host, so the whole
op replays from a CUDA graph. Neither grouped GEMM takes an SM budget: inside an execution unit
the green context bounds it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from nanoflow.kernels._compat import cdiv, jit, next_pow2, tl
from nanoflow.kernels.activation import silu_and_mul_ref, silu_and_mul_triton
from nanoflow.kernels.fp8_linear import Fp8Weight
from nanoflow.kernels.moe import check_moe_shapes
from nanoflow.kernels.quant import (
    quantize_fp8_ref,
    quantize_fp8_triton,
    silu_and_mul_quant_ref,
    silu_and_mul_quant_triton,
)

ALIGN = 16


@dataclass(frozen=True)
class PaddedRoute:
    """Where each (token, choice) pair sits in the expert-sorted, padded row layout."""

    source: torch.Tensor  # [rows] int64: the token each padded row copies
    position: torch.Tensor  # [tokens * top_k] int64: the padded row of pair token*top_k+choice
    ends: torch.Tensor  # [experts] int32: the end row of each expert's segment
    rows: int  # the layout's row count, a bound that depends on the token count only


def padded_route(topk_ids: torch.Tensor, num_experts: int) -> PaddedRoute:
    """The padded layout of ``topk_ids`` (``[tokens, top_k]``), built on the device without a
    host sync: a stable sort by expert, counts by ``scatter_add``, padded segment starts."""
    tokens, top_k = topk_ids.shape
    flat = topk_ids.reshape(-1).long()
    pairs = flat.numel()
    order = torch.sort(flat, stable=True).indices
    counts = torch.zeros(num_experts, dtype=torch.int64, device=flat.device)
    counts.scatter_add_(0, flat, torch.ones_like(flat))
    padded = (counts + ALIGN - 1) // ALIGN * ALIGN
    ends = torch.cumsum(padded, 0)
    first_padded = ends - padded
    first = torch.cumsum(counts, 0) - counts
    expert = flat[order]
    row = first_padded[expert] + torch.arange(pairs, device=flat.device) - first[expert]
    rows = pairs + num_experts * (ALIGN - 1)
    position = torch.empty_like(flat)
    position[order] = row
    source = torch.zeros(rows, dtype=torch.int64, device=flat.device)
    source[row] = order // top_k
    return PaddedRoute(source, position, ends.to(torch.int32), rows)


def combine_ref(
    rows: torch.Tensor, position: torch.Tensor, topk_weights: torch.Tensor, out: torch.Tensor
) -> torch.Tensor:
    """``out[t] = sum_j topk_weights[t, j] * rows[position[t * top_k + j]]``, in fp32."""
    tokens, top_k = topk_weights.shape
    picked = rows[position].view(tokens, top_k, -1).float()
    summed = (picked * topk_weights.float().unsqueeze(-1)).sum(1)
    return out.copy_(summed)


@jit
def _combine_kernel(
    rows_ptr, position_ptr, weight_ptr, out_ptr, width, stride_rows, stride_out,
    TOP_K: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    token = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < width
    acc = tl.zeros((BLOCK,), tl.float32)
    for j in tl.static_range(TOP_K):
        row = tl.load(position_ptr + token * TOP_K + j)
        weight = tl.load(weight_ptr + token * TOP_K + j).to(tl.float32)
        values = tl.load(rows_ptr + row * stride_rows + cols, mask=mask, other=0.0)
        acc += weight * values.to(tl.float32)
    tl.store(out_ptr + token * stride_out + cols, acc.to(out_ptr.dtype.element_ty), mask=mask)


def combine_triton(
    rows: torch.Tensor, position: torch.Tensor, topk_weights: torch.Tensor, out: torch.Tensor
) -> torch.Tensor:
    """Same contract as :func:`combine_ref`: one pass over the rows it reads."""
    tokens, top_k = topk_weights.shape
    if tokens == 0:
        return out
    width = rows.shape[1]
    block = min(1024, next_pow2(width)) if rows.is_cuda else min(64, next_pow2(width))
    weights = topk_weights.contiguous()
    _combine_kernel[(tokens, cdiv(width, block))](
        rows, position, weights, out, width, rows.stride(0), out.stride(0),
        TOP_K=top_k, BLOCK=block, num_warps=4,
    )  # fmt: skip
    return out


def _grouped(a: torch.Tensor, w: torch.Tensor, ends: torch.Tensor) -> torch.Tensor:
    """``a``'s segments times their experts' ``w[e].T`` (``w``: ``[E, N, K]``)."""
    return torch._grouped_mm(a, w.transpose(1, 2), offs=ends)


def _scaled_grouped(
    a: torch.Tensor, a_scale: torch.Tensor, w: Fp8Weight, ends: torch.Tensor
) -> torch.Tensor:
    """The e4m3 grouped GEMM with one scale per row of ``a`` and per output channel of each
    expert, bf16 out. Off the GPU (no e4m3 grouped GEMM there) both sides are dequantized
    exactly and multiplied in fp32, so the CPU tests run the same layout and scaling."""
    if a.is_cuda:
        return torch._scaled_grouped_mm(
            a, w.data.transpose(1, 2), a_scale, w.scale, offs=ends, out_dtype=torch.bfloat16
        )
    dequantized = a.float() * a_scale.unsqueeze(1)
    return _grouped(dequantized, w.dequantize(), ends).to(torch.bfloat16)


def fused_moe_grouped(
    x: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    num_ctas: int | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """``fused_moe_ref``'s contract on grouped GEMMs (``num_ctas`` is left to the execution
    unit). Triton kernels on CUDA tensors, the references elsewhere."""
    check_moe_shapes(x, w13, w2, topk_ids)
    out = torch.empty_like(x) if out is None else out
    if topk_ids.shape[0] == 0:
        return out
    route = padded_route(topk_ids, w13.shape[0])
    gate_up = _grouped(x[route.source], w13, route.ends)
    act = (silu_and_mul_triton if x.is_cuda else silu_and_mul_ref)(gate_up)
    down = _grouped(act, w2, route.ends)
    return (combine_triton if x.is_cuda else combine_ref)(down, route.position, topk_weights, out)


def fused_moe_fp8(
    x: torch.Tensor,
    w13: Fp8Weight,
    w2: Fp8Weight,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    num_ctas: int | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """The MoE MLP with e4m3 experts (``w13`` ``[E, 2I, H]``, ``w2`` ``[E, H, I]``, a scale per
    expert and output channel) and activations quantized per row: the tokens once before the
    gather, the SiLU-and-mul output in its own pass."""
    check_moe_shapes(x, w13, w2, topk_ids)
    out = torch.empty_like(x) if out is None else out
    if topk_ids.shape[0] == 0:
        return out
    on_gpu = x.is_cuda
    route = padded_route(topk_ids, w13.shape[0])
    data, scale = (quantize_fp8_triton if on_gpu else quantize_fp8_ref)(x)
    gate_up = _scaled_grouped(data[route.source], scale[route.source], w13, route.ends)
    act, act_scale = (silu_and_mul_quant_triton if on_gpu else silu_and_mul_quant_ref)(gate_up)
    down = _scaled_grouped(act, act_scale, w2, route.ends)
    return (combine_triton if on_gpu else combine_ref)(down, route.position, topk_weights, out)
