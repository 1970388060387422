"""Rotary position embedding (rotate-half form, as Llama/Mistral/Qwen2 in transformers) fused with
writing the token's K and V into the paged cache."""

from __future__ import annotations

import torch


def rope_kv_write_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    positions: torch.Tensor,
    cos_sin_cache: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """Rotate ``q`` ([T, Hq, D]) in place and store rotated ``k`` and ``v`` ([T, Hkv, D]) at
    ``slot_mapping`` (``block * block_size + offset``). ``cos_sin_cache`` is ``[max_pos, D]``:
    the cosines of the D/2 frequencies, then their sines."""
    half = q.shape[-1] // 2
    cs = cos_sin_cache[positions.long()].float()
    cos = cs[:, None, :half]
    sin = cs[:, None, half:]

    def rotate(x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        x1, x2 = xf[..., :half], xf[..., half:]
        return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).to(x.dtype)

    q.copy_(rotate(q))
    block_size = k_cache.shape[2]
    slots = slot_mapping.long()
    blocks, offsets = slots // block_size, slots % block_size
    k_cache[blocks, :, offsets] = rotate(k).to(k_cache.dtype)
    v_cache[blocks, :, offsets] = v.to(v_cache.dtype)
