"""Paged decode attention fed by the Tensor Memory Accelerator (Hopper and later).

All KV heads of one cache page lie next to each other (``[page, kv_heads, block_size,
head_dim]``), so the heads a work item reads from one page are one box of the cache seen as rows
of ``head_dim``: one TMA copy fetches it, where the default kernel issues a load per thread and
computes every address, and stages several pages ahead in shared memory. With fewer
instructions per byte and more bytes in flight, the few SMs the pipeline leaves decode attention
may pull more of HBM; an fp8 cache, whose default kernel holds one tile in registers, gains the
staging most. The Triton kernels' choice on Hopper (``DecodeConfig(tma=True)``) where the CUDA
kernel (decode_attention_cuda.py) does not apply.
"""

from __future__ import annotations

import torch

from nanoflow.kernels._compat import jit, next_pow2, tl
from nanoflow.kernels.decode_tiles import attend_tile, store_partial

MAX_BOX_ROWS = 256  # the TMA limit on a box dimension


@jit(do_not_specialize=("num_seqs", "num_splits", "split_pages", "stride_tb"))
def _decode_tma_kernel(
    q_ptr, k_desc, v_desc, tables_ptr, lens_ptr, part_out_ptr, part_lse_ptr,
    scale_log2, num_seqs, num_heads, num_kv_heads, num_chunks, num_splits, split_pages,
    stride_qb, stride_qh, stride_tb,
    HEADS: tl.constexpr, GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, HEAD_DIM: tl.constexpr,
    PAGE: tl.constexpr, NUM_STAGES: tl.constexpr, WIDEN: tl.constexpr, WIDE_TYPE: tl.constexpr,
):  # fmt: skip
    """Work item = (sequence, ``HEADS`` KV heads, context split); a tile is one page. Every item
    writes its partial output and log-sum-exp (base 2) for the reduce kernel. ``WIDEN`` (an fp8
    cache): the staged pages and the queries are widened to ``WIDE_TYPE`` for the dots."""
    kv = tl.arange(0, HEADS)
    rows = tl.arange(0, GROUP_PAD)
    dims = tl.arange(0, HEAD_DIM)
    cols = tl.arange(0, PAGE)
    row_mask = (rows < GROUP)[None, :, None]
    for item in range(tl.program_id(0), num_seqs * num_chunks * num_splits, tl.num_programs(0)):
        split = item % num_splits
        chunk = item // num_splits % num_chunks
        seq = item // num_splits // num_chunks
        length = tl.load(lens_ptr + seq)
        first = split * split_pages
        last = tl.minimum(first + split_pages, tl.cdiv(length, PAGE))
        heads = ((chunk * HEADS + kv) * GROUP)[:, None] + rows[None, :]  # [HEADS, GROUP_PAD]
        q = tl.load(
            q_ptr + seq * stride_qb + heads[:, :, None] * stride_qh + dims[None, None, :],
            mask=row_mask,
            other=0.0,
        )
        if WIDEN:
            q = q.to(WIDE_TYPE)
        table = tables_ptr + seq.to(tl.int64) * stride_tb
        m_i = tl.full([HEADS, GROUP_PAD], -1e30, tl.float32)
        l_i = tl.zeros([HEADS, GROUP_PAD], tl.float32)
        acc = tl.zeros([HEADS, GROUP_PAD, HEAD_DIM], tl.float32)
        for t in tl.range(first, last, num_stages=NUM_STAGES):
            box = (tl.load(table + t) * num_kv_heads + chunk * HEADS) * PAGE
            k = tl.reshape(k_desc.load([box, 0]), [HEADS, PAGE, HEAD_DIM])
            v = tl.reshape(v_desc.load([box, 0]), [HEADS, PAGE, HEAD_DIM])
            if WIDEN:
                k, v = k.to(WIDE_TYPE), v.to(WIDE_TYPE)
            valid = t * PAGE + cols < length
            m_i, l_i, acc = attend_tile(q, k, v, valid, m_i, l_i, acc, scale_log2)
        o = acc / tl.where(l_i > 0, l_i, 1.0)[:, :, None]
        store_partial(
            part_out_ptr, part_lse_ptr, o, m_i, l_i, seq, heads, split, num_heads, num_splits,
            HEAD_DIM, GROUP,
        )  # fmt: skip


def check_tma_inputs(q: torch.Tensor, k_cache: torch.Tensor, heads_per_item: int) -> None:
    """What a TMA box over the cache needs, said plainly when it is missing."""
    page = k_cache.shape[2]
    if not k_cache.is_contiguous():
        raise ValueError("the TMA decode path needs contiguous caches (boxes of whole pages)")
    if heads_per_item * page > MAX_BOX_ROWS:
        raise ValueError(
            f"a TMA box holds at most {MAX_BOX_ROWS} rows: {heads_per_item} heads x {page}-token "
            "pages is too many; use fewer parallel heads"
        )


def launch_decode_tma(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale_log2: float,
    grid: int,
    heads_per_item: int,
    splits: int,
    split_len: int,
    part_out: torch.Tensor,
    part_lse: torch.Tensor,
    num_warps: int,
    num_stages: int,
) -> None:
    """Fill ``part_out`` / ``part_lse`` for the reduce kernel; ``split_len`` is whole pages."""
    from triton.tools.tensor_descriptor import TensorDescriptor

    check_tma_inputs(q, k_cache, heads_per_item)
    batch, num_heads, head_dim = q.shape
    num_kv_heads, page = k_cache.shape[1], k_cache.shape[2]
    box = [heads_per_item * page, head_dim]
    k_desc, v_desc = (
        TensorDescriptor.from_tensor(cache.view(-1, head_dim), box) for cache in (k_cache, v_cache)
    )
    group = num_heads // num_kv_heads
    _decode_tma_kernel[(grid,)](
        q, k_desc, v_desc, block_tables, context_lens, part_out, part_lse, scale_log2,
        batch, num_heads, num_kv_heads, num_kv_heads // heads_per_item, splits, split_len // page,
        q.stride(0), q.stride(1), block_tables.stride(0),
        HEADS=heads_per_item, GROUP=group, GROUP_PAD=max(16, next_pow2(group)),
        HEAD_DIM=head_dim, PAGE=page, NUM_STAGES=num_stages, num_warps=num_warps,
        WIDEN=k_cache.dtype != q.dtype,
        WIDE_TYPE=tl.float16 if q.element_size() == 2 else tl.float32,
    )  # fmt: skip
