"""Prefill / extend attention over the paged cache for a packed batch of prompt chunks.

Chunk ``b`` holds queries ``cu_q_lens[b] ... cu_q_lens[b+1]-1`` of ``q``; its K/V (cached prefix
plus the chunk itself, already written by the RoPE op) are the first ``context_lens[b]`` tokens of
the sequence's blocks. Query ``i`` of the chunk sits at position ``context_lens[b] - q_len + i`` and
attends causally to every key at or before it.
"""

from __future__ import annotations

import torch

from nanoflow.kernels.decode_attention import gather_kv


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
        q_pos = torch.arange(ctx - q_len, ctx).unsqueeze(1)
        k_pos = torch.arange(ctx).unsqueeze(0)
        scores.masked_fill_(k_pos > q_pos, float("-inf"))
        probs = torch.softmax(scores, dim=-1)
        out[q_start:q_end] = torch.einsum("hqk,hkd->qhd", probs, v).to(out.dtype)
    return out
