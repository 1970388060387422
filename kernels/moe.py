"""Fused mixture-of-experts MLP: every (token, chosen expert) pair through its expert's gated MLP,
weighted by its routing weight and summed back into the token's row.

The pairs are sorted by expert so each expert's weights are read once per tile of its tokens (a
grouped GEMM). Two launches of one persistent kernel do the work: gate-up with SiLU-mul fused into
the epilogue (rows gathered from the tokens through the sorted pair index), then down with the
routing weight fused in. Pair rows stay in pair order (``token * top_k + choice``), so the final
combine is a plain sum over ``top_k`` with no atomics, deterministic like the reference.

Weights: ``w13`` is ``[E, 2*I, hidden]`` (each expert's gate rows, then its up rows), ``w2`` is
``[E, hidden, I]``. Everything the tiling needs is built on the device, without a host sync, so
the kernel can be launched ahead of the GPU inside the pipeline.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from nanoflow.kernels._compat import cdiv, check_num_ctas, jit, sm_count, tl


def sort_by_expert(topk_ids: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(pair indices sorted by expert (stable), ``[E + 1]`` segment offsets), both int64.

    Pair ``p`` is choice ``p % top_k`` of token ``p // top_k``; expert ``e``'s pairs are
    ``order[offsets[e]:offsets[e + 1]]``. Counting with ``scatter_add`` (not ``bincount``) keeps
    this free of host syncs on the GPU.
    """
    flat = topk_ids.reshape(-1).long()
    order = torch.sort(flat, stable=True).indices
    counts = torch.zeros(num_experts, dtype=torch.int64, device=flat.device)
    counts.scatter_add_(0, flat, torch.ones_like(flat))
    offsets = torch.zeros(num_experts + 1, dtype=torch.int64, device=flat.device)
    torch.cumsum(counts, 0, out=offsets[1:])
    return order, offsets


def check_moe_shapes(x: torch.Tensor, w13: Any, w2: Any, topk_ids: torch.Tensor) -> None:
    """Refuse an ``x``, ``w13`` ``[E, 2I, H]``, ``w2`` ``[E, H, I]`` and ``topk_ids`` that do
    not describe one MoE MLP (the weights tensors or FP8 stacks)."""
    tokens, _ = topk_ids.shape
    num_experts, two_inter, hidden = w13.shape
    if x.shape != (tokens, hidden) or tuple(w2.shape) != (num_experts, hidden, two_inter // 2):
        raise ValueError(
            f"fused_moe: x {tuple(x.shape)}, w13 {tuple(w13.shape)}, w2 {tuple(w2.shape)} and "
            f"topk_ids {tuple(topk_ids.shape)} do not fit together"
        )


def fused_moe_ref(
    x: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    num_ctas: int | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Reference: one GEMM pair per expert over its sorted segment; ``num_ctas`` is ignored.

    Rounds where the kernel does (the SiLU-mul output and the weighted down rows are stored in
    ``x``'s dtype) so the two agree in half precision too.
    """
    tokens, top_k = topk_ids.shape
    inter = w2.shape[2]
    order, offsets = sort_by_expert(topk_ids, w13.shape[0])
    rows = x[order // top_k]
    down = torch.zeros(tokens * top_k, x.shape[1], dtype=x.dtype, device=x.device)
    bounds = offsets.tolist()
    for e in range(w13.shape[0]):
        seg = slice(bounds[e], bounds[e + 1])
        if seg.start == seg.stop:
            continue
        gate_up = F.linear(rows[seg].float(), w13[e].float())
        act = (F.silu(gate_up[:, :inter]) * gate_up[:, inter:]).to(x.dtype)
        weight = topk_weights.reshape(-1)[order[seg]].float().unsqueeze(1)
        down[order[seg]] = (F.linear(act.float(), w2[e].float()) * weight).to(x.dtype)
    result = down.view(tokens, top_k, -1).float().sum(1).to(x.dtype)
    if out is None:
        return result
    out.copy_(result)
    return out


@dataclass(frozen=True)
class ExpertTiles:
    """Row tiles of the expert-sorted pairs: tile ``t`` covers ``pairs[start[t]:end[t]]`` (at most
    ``block_m`` of them), all routed to ``expert[t]``; only the first ``count[0]`` tiles exist."""

    pairs: torch.Tensor
    expert: torch.Tensor
    start: torch.Tensor
    end: torch.Tensor
    count: torch.Tensor
    max_tiles: int
    block_m: int


def expert_tiles(topk_ids: torch.Tensor, num_experts: int, block_m: int) -> ExpertTiles:
    order, offsets = sort_by_expert(topk_ids, num_experts)
    counts = offsets[1:] - offsets[:-1]
    per_expert = (counts + block_m - 1) // block_m
    cu_tiles = torch.cumsum(per_expert, 0)
    max_tiles = cdiv(topk_ids.numel(), block_m) + num_experts
    tile = torch.arange(max_tiles, device=topk_ids.device)
    expert = torch.searchsorted(cu_tiles, tile, right=True).clamp_(max=num_experts - 1)
    first = cu_tiles[expert] - per_expert[expert]
    return ExpertTiles(
        pairs=order.to(torch.int32),
        expert=expert.to(torch.int32),
        start=(offsets[expert] + (tile - first) * block_m).to(torch.int32),
        end=offsets[expert + 1].to(torch.int32),
        count=cu_tiles[-1:].to(torch.int32),
        max_tiles=max_tiles,
        block_m=block_m,
    )


@jit
def _moe_gemm_kernel(
    a_ptr, w_ptr, c_ptr, route_w_ptr,
    pairs_ptr, tile_expert_ptr, tile_start_ptr, tile_end_ptr, tile_count_ptr,
    N, K, n_tiles_n, stride_am, stride_we, stride_wn, stride_wk, stride_cm, num_ctas,
    ROW_DIV: tl.constexpr, SILU: tl.constexpr, WEIGHTED: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """Persistent grouped GEMM: ``c[pair] = a[pair // ROW_DIV] @ w[expert].T`` per tile, with
    ``silu(gate) * up`` (rows ``n`` and ``N + n`` of ``w``) or the routing weight fused in."""
    total = tl.load(tile_count_ptr) * n_tiles_n
    for tile in range(tl.program_id(0), total, num_ctas):
        tm = tile // n_tiles_n
        expert = tl.load(tile_expert_ptr + tm).to(tl.int64)
        offs_m = tl.load(tile_start_ptr + tm) + tl.arange(0, BLOCK_M)
        mask_m = offs_m < tl.load(tile_end_ptr + tm)
        pairs = tl.load(pairs_ptr + offs_m, mask=mask_m, other=0).to(tl.int64)
        offs_n = (tile % n_tiles_n) * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_n = offs_n < N
        offs_k = tl.arange(0, BLOCK_K)
        a_ptrs = a_ptr + (pairs // ROW_DIV)[:, None] * stride_am + offs_k[None, :]
        w_ptrs = (
            w_ptr + expert * stride_we + offs_n[None, :] * stride_wn + offs_k[:, None] * stride_wk
        )
        acc = tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32)
        acc_up = tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32)
        for k0 in range(0, K, BLOCK_K):
            mask_k = offs_k < K - k0
            a = tl.load(a_ptrs, mask=mask_m[:, None] & mask_k[None, :], other=0.0)
            w_mask = mask_k[:, None] & mask_n[None, :]
            acc = tl.dot(a, tl.load(w_ptrs, mask=w_mask, other=0.0), acc)
            if SILU:
                up = tl.load(w_ptrs + N * stride_wn, mask=w_mask, other=0.0)
                acc_up = tl.dot(a, up, acc_up)
            a_ptrs += BLOCK_K
            w_ptrs += BLOCK_K * stride_wk
        if SILU:
            acc = acc / (1.0 + tl.exp(-acc)) * acc_up
        if WEIGHTED:
            acc = acc * tl.load(route_w_ptr + pairs, mask=mask_m, other=0.0)[:, None]
        c_ptrs = c_ptr + pairs[:, None] * stride_cm + offs_n[None, :]
        tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


def _block_m(pairs_per_expert: float) -> int:
    """Row tile: small for decode-sized batches (few pairs per expert), wider when there are
    enough rows to reuse each weight tile."""
    for block in (16, 32):
        if pairs_per_expert <= block:
            return block
    return 64


def tile_nk(device: torch.device) -> tuple[int, int]:
    """(BLOCK_N, BLOCK_K): H100-sized tiles on the GPU, small ones for the CPU interpreter."""
    return (128, 64) if device.type == "cuda" else (32, 32)


def _launch(
    a: torch.Tensor,
    w: torch.Tensor,
    c: torch.Tensor,
    route_w: torch.Tensor,
    tiles: ExpertTiles,
    row_div: int,
    silu: bool,
    num_ctas: int | None,
) -> None:
    on_gpu = a.device.type == "cuda"
    n = w.shape[1] // 2 if silu else w.shape[1]
    block_n, block_k = tile_nk(a.device)
    n_tiles = cdiv(n, block_n)
    ctas = min(num_ctas or sm_count(a.device), tiles.max_tiles * n_tiles)
    _moe_gemm_kernel[(ctas,)](
        a, w, c, route_w,
        tiles.pairs, tiles.expert, tiles.start, tiles.end, tiles.count,
        n, a.shape[1], n_tiles, a.stride(0), w.stride(0), w.stride(1), w.stride(2), c.stride(0),
        ctas,
        ROW_DIV=row_div, SILU=silu, WEIGHTED=not silu,
        BLOCK_M=tiles.block_m, BLOCK_N=block_n, BLOCK_K=block_k,
        num_warps=8 if on_gpu else 4, num_stages=3 if on_gpu else 1,
    )  # fmt: skip


def fused_moe_triton(
    x: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    num_ctas: int | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Same contract as :func:`fused_moe_ref`; ``num_ctas`` caps the persistent grid (the SM
    budget of the op's execution unit)."""
    check_num_ctas(num_ctas)
    check_moe_shapes(x, w13, w2, topk_ids)
    tokens, top_k = topk_ids.shape
    num_experts, two_inter, hidden = w13.shape
    if x.stride(1) != 1 or w13.stride(2) != 1 or w2.stride(2) != 1:
        raise ValueError("fused_moe needs x, w13 and w2 contiguous in their last dimension")
    if out is None:
        out = torch.empty_like(x)
    if tokens == 0:
        return out
    tiles = expert_tiles(topk_ids, num_experts, _block_m(tokens * top_k / num_experts))
    route_w = topk_weights.reshape(-1).float().contiguous()
    act = torch.empty(tokens * top_k, two_inter // 2, device=x.device, dtype=x.dtype)
    _launch(x, w13, act, route_w, tiles, row_div=top_k, silu=True, num_ctas=num_ctas)
    down = torch.empty(tokens * top_k, hidden, device=x.device, dtype=x.dtype)
    _launch(act, w2, down, route_w, tiles, row_div=1, silu=False, num_ctas=num_ctas)
    torch.sum(down.view(tokens, top_k, hidden), dim=1, out=out)
    return out
