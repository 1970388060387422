"""Device functions both decode attention kernels share (the default one and the TMA-fed one):
the online-softmax step over one K/V tile, and a work item's partial result for the reduce."""

from __future__ import annotations

from nanoflow.kernels._compat import jit, tl


@jit
def attend_tile(q, k, v, valid, m_i, l_i, acc, scale_log2):
    """One online-softmax step of every head in the tile over one K/V tile."""
    s = tl.dot(q, tl.permute(k, (0, 2, 1))) * scale_log2
    s = tl.where(valid[None, None, :], s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 2))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, :, None])
    l_i = l_i * alpha + tl.sum(p, 2)
    acc = acc * alpha[:, :, None] + tl.dot(p.to(q.dtype), v)
    return m_new, l_i, acc


@jit
def store_partial(
    part_out_ptr, part_lse_ptr, o, m_i, l_i, seq, heads, split, num_heads, num_splits,
    HEAD_DIM: tl.constexpr, GROUP: tl.constexpr,
):  # fmt: skip
    """A split's output and log-sum-exp (base 2) of its heads, for the reduce kernel; an empty
    split stores zeros with a log-sum-exp of -inf, which the reduce gives no weight."""
    rows = tl.arange(0, heads.shape[1])
    dims = tl.arange(0, HEAD_DIM)
    part = (seq * num_heads + heads) * num_splits + split
    row_mask = (rows < GROUP)[None, :, None]
    tl.store(part_out_ptr + part[:, :, None] * HEAD_DIM + dims[None, None, :], o, mask=row_mask)
    tl.store(part_lse_ptr + part, m_i + tl.log2(l_i), mask=rows[None, :] < GROUP)
