"""Rotary position embedding (rotate-half form, as Llama/Mistral/Qwen2 in transformers) fused with
writing the token's K and V into the paged cache."""

from __future__ import annotations

import torch

from nanoflow.kernels._compat import jit, next_pow2, tl


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


@jit
def _halves(ptr, num_heads, head_stride, HEADS_PAD: tl.constexpr, HALF: tl.constexpr,
            HALF_PAD: tl.constexpr):  # fmt: skip
    """The two halves of every head of one token (``ptr``: its first head)."""
    heads = tl.arange(0, HEADS_PAD)[:, None]
    dims = tl.arange(0, HALF_PAD)[None, :]
    mask = (heads < num_heads) & (dims < HALF)
    src = ptr + heads * head_stride + dims
    return tl.load(src, mask=mask, other=0.0), tl.load(src + HALF, mask=mask, other=0.0)


@jit
def _store_rotated(
    ptr, x1, x2, num_heads, head_stride, cos, sin,
    HEADS_PAD: tl.constexpr, HALF: tl.constexpr, HALF_PAD: tl.constexpr,
):  # fmt: skip
    """Rotate-half of every head of one token, rounded as the input, stored at ``ptr``."""
    heads = tl.arange(0, HEADS_PAD)[:, None]
    dims = tl.arange(0, HALF_PAD)[None, :]
    mask = (heads < num_heads) & (dims < HALF)
    y1 = (x1.to(tl.float32) * cos - x2.to(tl.float32) * sin).to(x1.dtype)
    y2 = (x2.to(tl.float32) * cos + x1.to(tl.float32) * sin).to(x1.dtype)
    dst = ptr + heads * head_stride + dims
    tl.store(dst, y1.to(ptr.dtype.element_ty), mask=mask)
    tl.store(dst + HALF, y2.to(ptr.dtype.element_ty), mask=mask)


@jit(do_not_specialize_on_alignment=("pos_ptr", "slot_ptr"))
def _rope_kv_write_kernel(
    q_ptr, k_ptr, v_ptr, pos_ptr, cs_ptr, kc_ptr, vc_ptr, slot_ptr, num_heads, num_kv_heads,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_cs,
    stride_kcb, stride_kch, stride_kct, stride_vcb, stride_vch, stride_vct,
    Q_PAD: tl.constexpr, KV_PAD: tl.constexpr, HALF: tl.constexpr, HALF_PAD: tl.constexpr,
    PAGE: tl.constexpr,
):  # fmt: skip
    """One token per program: all its heads at once, so cos/sin are loaded once. Every load
    comes before the first store: q is rotated in place, and a store the compiler cannot prove
    apart from the later loads would hold those loads back behind it."""
    t = tl.program_id(0).to(tl.int64)
    q1, q2 = _halves(q_ptr + t * stride_qt, num_heads, stride_qh, Q_PAD, HALF, HALF_PAD)
    k1, k2 = _halves(k_ptr + t * stride_kt, num_kv_heads, stride_kh, KV_PAD, HALF, HALF_PAD)
    heads = tl.arange(0, KV_PAD)[:, None]
    full = tl.arange(0, 2 * HALF_PAD)[None, :]
    v_mask = (heads < num_kv_heads) & (full < 2 * HALF)
    v = tl.load(v_ptr + t * stride_vt + heads * stride_vh + full, mask=v_mask)
    dims = tl.arange(0, HALF_PAD)
    cs = cs_ptr + tl.load(pos_ptr + t).to(tl.int64) * stride_cs + dims
    cos = tl.load(cs, mask=dims < HALF, other=0.0).to(tl.float32)[None, :]
    sin = tl.load(cs + HALF, mask=dims < HALF, other=0.0).to(tl.float32)[None, :]
    slot = tl.load(slot_ptr + t).to(tl.int64)
    _store_rotated(
        q_ptr + t * stride_qt, q1, q2, num_heads, stride_qh, cos, sin, Q_PAD, HALF, HALF_PAD
    )
    kc = kc_ptr + slot // PAGE * stride_kcb + slot % PAGE * stride_kct
    _store_rotated(kc, k1, k2, num_kv_heads, stride_kch, cos, sin, KV_PAD, HALF, HALF_PAD)
    vc = vc_ptr + slot // PAGE * stride_vcb + slot % PAGE * stride_vct
    tl.store(vc + heads * stride_vch + full, v.to(vc_ptr.dtype.element_ty), mask=v_mask)


def _check_rope(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    positions: torch.Tensor,
    cos_sin_cache: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    if q.dim() != 3 or k.dim() != 3 or k.shape != v.shape or q.shape[::2] != k.shape[::2]:
        raise ValueError(
            "q must be [T, Hq, D] and k, v [T, Hkv, D], got "
            f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )
    tokens, num_kv_heads, head_dim = k.shape
    if head_dim % 2 or cos_sin_cache.dim() != 2 or cos_sin_cache.shape[1] != head_dim:
        raise ValueError(
            f"head_dim must be even and cos_sin_cache [max_pos, {head_dim}], "
            f"got {tuple(cos_sin_cache.shape)}"
        )
    expected = (num_kv_heads, head_dim)
    if k_cache.dim() != 4 or k_cache.shape != v_cache.shape or k_cache.shape[1::2] != expected:
        raise ValueError(
            f"k_cache, v_cache must be [num_blocks, {num_kv_heads}, block_size, {head_dim}], "
            f"got {tuple(k_cache.shape)}, {tuple(v_cache.shape)}"
        )
    for name, index in (("positions", positions), ("slot_mapping", slot_mapping)):
        if index.shape != (tokens,) or index.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"{name} must be an int tensor of shape [{tokens}]")
    tensors = (q, k, v, positions, cos_sin_cache, k_cache, v_cache, slot_mapping)
    if any(t.device != q.device for t in tensors):
        raise ValueError("all tensors must be on the same device")
    if any(t.stride(-1) != 1 for t in tensors[:3] + tensors[4:7]):
        raise ValueError("q, k, v, cos_sin_cache and the caches must be contiguous in head_dim")


def rope_kv_write_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    positions: torch.Tensor,
    cos_sin_cache: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """RoPE on q (in place) and k, and the K/V cache write, in one launch of one program per
    token; q, k, v may be strided views into the fused QKV output."""
    _check_rope(q, k, v, positions, cos_sin_cache, k_cache, v_cache, slot_mapping)
    if q.shape[0] == 0:
        return
    half = q.shape[2] // 2
    kv_pad = next_pow2(k.shape[1])
    _rope_kv_write_kernel[(q.shape[0],)](
        q, k, v, positions, cos_sin_cache, k_cache, v_cache, slot_mapping, q.shape[1], k.shape[1],
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        cos_sin_cache.stride(0), *k_cache.stride()[:3], *v_cache.stride()[:3],
        Q_PAD=next_pow2(q.shape[1]), KV_PAD=kv_pad, HALF=half, HALF_PAD=next_pow2(half),
        PAGE=k_cache.shape[2], num_warps=4,
    )  # fmt: skip
