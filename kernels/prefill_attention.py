"""Prefill / extend attention over the paged cache for a packed batch of prompt chunks.

Chunk ``b`` holds queries ``cu_q_lens[b] ... cu_q_lens[b+1]-1`` of ``q``; its K/V (cached prefix
plus the chunk itself, already written by the RoPE op) are the first ``context_lens[b]`` tokens of
the sequence's blocks. Query ``i`` of the chunk sits at position ``context_lens[b] - q_len + i`` and
attends causally to every key at or before it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from nanoflow.kernels._compat import cdiv, check_num_ctas, jit, next_pow2, tl
from nanoflow.kernels.decode_attention import LOG2E, check_paged_inputs, gather_kv


def paged_prefill_attention_ref(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    cu_q_lens: torch.Tensor,
    context_lens: torch.Tensor,
    max_q_len: int,
    scale: float,
    num_ctas: int | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Reference: ``q`` is ``[num_tokens, num_heads, head_dim]``; ``max_q_len`` is a launch hint."""
    num_heads = q.shape[1]
    group = num_heads // k_cache.shape[1]
    if out is None:
        out = torch.empty_like(q)
    starts = cu_q_lens.tolist()
    for b, ctx in enumerate(context_lens.tolist()):
        q_start, q_end = starts[b], starts[b + 1]
        q_len = q_end - q_start
        if q_len == 0:
            continue
        k = gather_kv(k_cache, block_tables[b], ctx).float().repeat_interleave(group, dim=0)
        v = gather_kv(v_cache, block_tables[b], ctx).float().repeat_interleave(group, dim=0)
        qs = q[q_start:q_end].float().transpose(0, 1)  # [H, q_len, D]
        scores = torch.einsum("hqd,hkd->hqk", qs, k) * scale
        q_pos = torch.arange(ctx - q_len, ctx, device=q.device).unsqueeze(1)
        k_pos = torch.arange(ctx, device=q.device).unsqueeze(0)
        scores.masked_fill_(k_pos > q_pos, float("-inf"))
        probs = torch.softmax(scores, dim=-1)
        out[q_start:q_end] = torch.einsum("hqk,hkd->qhd", probs, v).to(out.dtype)
    return out


@dataclass(frozen=True)
class PrefillConfig:
    """``block_m`` rows of (query, head-of-the-group) pairs share each K/V tile of ``block_n``."""

    block_m: int
    block_n: int
    num_warps: int
    num_stages: int


def prefill_config(head_dim: int, dtype: torch.dtype, device: torch.device) -> PrefillConfig:
    """FlashAttention-2-like tiles on the GPU; small tiles on CPU so the interpreter covers the
    tile boundaries."""
    if device.type != "cuda":
        return PrefillConfig(block_m=32, block_n=16, num_warps=4, num_stages=1)
    if head_dim <= 64:
        return PrefillConfig(block_m=128, block_n=64, num_warps=4, num_stages=3)
    return PrefillConfig(block_m=128, block_n=64, num_warps=8, num_stages=3)


@jit
def _attend(
    acc, m_i, l_i, q, k_ptr, v_ptr, table, kv_head, positions, lo, hi, scale_log2,
    stride_kb, stride_kh, stride_kt, stride_vb, stride_vh, stride_vt,
    HEAD_DIM: tl.constexpr, PAGE: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr,
    NUM_STAGES: tl.constexpr,
):  # fmt: skip
    """Online softmax over keys ``lo ... hi-1``; ``CAUSAL`` masks keys after each row's position
    (only the tiles on the diagonal need it)."""
    dims = tl.arange(0, HEAD_DIM)
    for start in tl.range(lo, hi, BLOCK_N, num_stages=NUM_STAGES):
        keys = start + tl.arange(0, BLOCK_N)
        valid = keys < hi
        pages = tl.load(table + keys // PAGE, mask=valid, other=0).to(tl.int64)
        k_off = kv_head * stride_kh + (keys % PAGE)[:, None] * stride_kt + dims[None, :]
        v_off = kv_head * stride_vh + (keys % PAGE)[:, None] * stride_vt + dims[None, :]
        k = tl.load(k_ptr + pages[:, None] * stride_kb + k_off, mask=valid[:, None], other=0.0)
        v = tl.load(v_ptr + pages[:, None] * stride_vb + v_off, mask=valid[:, None], other=0.0)
        k, v = k.to(q.dtype), v.to(q.dtype)  # an fp8 cache, widened after the narrow load
        s = tl.dot(q, tl.trans(k)) * scale_log2
        if CAUSAL:
            s = tl.where(valid[None, :] & (keys[None, :] <= positions[:, None]), s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(q.dtype), v)
        m_i = m_new
    return acc, m_i, l_i


@jit(do_not_specialize=("num_chunks", "tiles_per_chunk", "stride_tb"))
def _prefill_kernel(
    q_ptr, k_ptr, v_ptr, tables_ptr, cu_ptr, lens_ptr, out_ptr, scale_log2,
    num_chunks, num_kv_heads, tiles_per_chunk,
    stride_qt, stride_qh, stride_kb, stride_kh, stride_kt, stride_vb, stride_vh, stride_vt,
    stride_tb, stride_ot, stride_oh,
    GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, HEAD_DIM: tl.constexpr, PAGE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_N: tl.constexpr, NUM_STAGES: tl.constexpr,
):  # fmt: skip
    """Work item = (query tile, chunk, KV head), heaviest (last) tiles first; a tile's rows are
    (query, head) pairs of one KV head's group, so each K/V tile serves the whole group."""
    rows = tl.arange(0, BLOCK_M)
    dims = tl.arange(0, HEAD_DIM)
    for item in range(
        tl.program_id(0), tiles_per_chunk * num_chunks * num_kv_heads, tl.num_programs(0)
    ):
        kv_head = item % num_kv_heads
        chunk = item // num_kv_heads % num_chunks
        first = (tiles_per_chunk - 1 - item // num_kv_heads // num_chunks) * BLOCK_Q
        q_start = tl.load(cu_ptr + chunk)
        q_len = tl.load(cu_ptr + chunk + 1) - q_start
        if first < q_len:
            ctx = tl.load(lens_ptr + chunk)
            queries = first + rows // GROUP_PAD
            heads = kv_head * GROUP + rows % GROUP_PAD
            row_mask = (queries < q_len) & (rows % GROUP_PAD < GROUP)
            positions = ctx - q_len + queries
            q_off = (q_start + queries)[:, None] * stride_qt + heads[:, None] * stride_qh
            q = tl.load(q_ptr + q_off + dims[None, :], mask=row_mask[:, None], other=0.0)
            table = tables_ptr + chunk.to(tl.int64) * stride_tb
            m_i = tl.full([BLOCK_M], -1e30, tl.float32)
            l_i = tl.zeros([BLOCK_M], tl.float32)
            acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
            # Keys before the tile's first position are visible to every row: no mask there.
            unmasked = (ctx - q_len + first + 1) // BLOCK_N * BLOCK_N
            hi = ctx - q_len + tl.minimum(first + BLOCK_Q, q_len)
            acc, m_i, l_i = _attend(
                acc, m_i, l_i, q, k_ptr, v_ptr, table, kv_head, positions, 0, unmasked,
                scale_log2, stride_kb, stride_kh, stride_kt, stride_vb, stride_vh, stride_vt,
                HEAD_DIM, PAGE, BLOCK_N, False, NUM_STAGES,
            )  # fmt: skip
            acc, m_i, l_i = _attend(
                acc, m_i, l_i, q, k_ptr, v_ptr, table, kv_head, positions, unmasked, hi,
                scale_log2, stride_kb, stride_kh, stride_kt, stride_vb, stride_vh, stride_vt,
                HEAD_DIM, PAGE, BLOCK_N, True, NUM_STAGES,
            )  # fmt: skip
            o = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
            o_off = (q_start + queries)[:, None] * stride_ot + heads[:, None] * stride_oh
            o_ptrs = out_ptr + o_off + dims[None, :]
            tl.store(o_ptrs, o.to(out_ptr.dtype.element_ty), mask=row_mask[:, None])


def _launch_prefill(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    cu_q_lens: torch.Tensor,
    context_lens: torch.Tensor,
    max_q_len: int,
    scale: float,
    num_ctas: int | None,
    out: torch.Tensor,
    config: PrefillConfig,
) -> torch.Tensor:
    num_heads, head_dim = q.shape[1:]
    num_kv_heads, page = k_cache.shape[1], k_cache.shape[2]
    group = num_heads // num_kv_heads
    group_pad = next_pow2(group)
    block_m = max(config.block_m, group_pad)
    block_q = block_m // group_pad
    tiles_per_chunk = cdiv(max_q_len, block_q)
    items = tiles_per_chunk * context_lens.shape[0] * num_kv_heads
    _prefill_kernel[(min(items, num_ctas or items),)](
        q, k_cache, v_cache, block_tables, cu_q_lens, context_lens, out, scale * LOG2E,
        context_lens.shape[0], num_kv_heads, tiles_per_chunk,
        q.stride(0), q.stride(1), *k_cache.stride()[:3], *v_cache.stride()[:3],
        block_tables.stride(0), out.stride(0), out.stride(1),
        GROUP=group, GROUP_PAD=group_pad, HEAD_DIM=head_dim, PAGE=page, BLOCK_M=block_m,
        BLOCK_Q=block_q, BLOCK_N=config.block_n, NUM_STAGES=config.num_stages,
        num_warps=config.num_warps,
    )  # fmt: skip
    return out


def paged_prefill_attention_triton(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    cu_q_lens: torch.Tensor,
    context_lens: torch.Tensor,
    max_q_len: int,
    scale: float,
    num_ctas: int | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Flash attention (online softmax) of packed prompt chunks over their paged K/V, at most
    ``num_ctas`` programs when given. ``max_q_len`` bounds the grid, so no host sync is needed;
    it must be at least the longest chunk."""
    check_paged_inputs(q, k_cache, v_cache, block_tables, context_lens, out)
    check_num_ctas(num_ctas)
    if cu_q_lens.shape != (context_lens.shape[0] + 1,) or cu_q_lens.dtype not in (
        torch.int32,
        torch.int64,
    ):
        raise ValueError("cu_q_lens must be an int32 tensor of batch + 1 query offsets")
    if cu_q_lens.device != q.device:
        raise ValueError("cu_q_lens must be on the same device as q")
    if max_q_len < 0:
        raise ValueError(f"max_q_len must be >= 0, got {max_q_len}")
    if out is None:
        out = torch.empty_like(q)
    if q.shape[0] == 0 or context_lens.shape[0] == 0 or max_q_len == 0:
        return out
    config = prefill_config(q.shape[2], q.dtype, q.device)
    return _launch_prefill(
        q, k_cache, v_cache, block_tables, cu_q_lens, context_lens, max_q_len, scale, num_ctas,
        out, config,
    )  # fmt: skip
