"""Paged decode attention: one query token per sequence against its paged K/V history.

KV cache layout (shared by every kernel): ``k_cache`` and ``v_cache`` are
``[num_blocks, num_kv_heads, block_size, head_dim]``; ``block_tables[b, i]`` is the physical block
holding tokens ``i*block_size ... (i+1)*block_size - 1`` of sequence ``b``.
"""

from __future__ import annotations

import torch


def gather_kv(
    cache: torch.Tensor, block_table: torch.Tensor, length: int
) -> torch.Tensor:
    """The first ``length`` tokens of one sequence as ``[num_kv_heads, length, head_dim]``."""
    block_size = cache.shape[2]
    num_blocks = (length + block_size - 1) // block_size
    blocks = cache[block_table[:num_blocks].long()]  # [n, H, bs, D]
    return blocks.transpose(0, 1).reshape(cache.shape[1], -1, cache.shape[3])[:, :length]


def paged_decode_attention_ref(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    num_ctas: int | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Reference: ``q`` is ``[batch, num_heads, head_dim]``; ``context_lens`` counts the new token.

    ``num_ctas`` is the SM budget of the Triton kernel; the reference ignores it.
    """
    batch, num_heads, head_dim = q.shape
    group = num_heads // k_cache.shape[1]
    if out is None:
        out = torch.empty_like(q)
    for b, length in enumerate(context_lens.tolist()):
        k = gather_kv(k_cache, block_tables[b], length).float()
        v = gather_kv(v_cache, block_tables[b], length).float()
        k = k.repeat_interleave(group, dim=0)
        v = v.repeat_interleave(group, dim=0)
        scores = torch.einsum("hd,hld->hl", q[b].float(), k) * scale
        probs = torch.softmax(scores, dim=-1)
        out[b] = torch.einsum("hl,hld->hd", probs, v).to(out.dtype)
    return out
