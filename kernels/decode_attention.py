"""Paged decode attention: one query token per sequence against its paged K/V history.

KV cache layout (shared by every kernel): ``k_cache`` and ``v_cache`` are
``[num_blocks, num_kv_heads, block_size, head_dim]``; ``block_tables[b, i]`` is the physical block
holding tokens ``i*block_size ... (i+1)*block_size - 1`` of sequence ``b``.
"""

from __future__ import annotations

import functools
import math
import os
from dataclasses import dataclass

import torch

from nanoflow.kernels import decode_attention_cuda as cuda_kernel
from nanoflow.kernels._compat import cdiv, check_num_ctas, jit, next_pow2, sm_count, tl
from nanoflow.kernels.decode_attention_tma import launch_decode_tma
from nanoflow.kernels.decode_tiles import attend_tile, store_partial

LOG2E = math.log2(math.e)


def gather_kv(cache: torch.Tensor, block_table: torch.Tensor, length: int) -> torch.Tensor:
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


@dataclass(frozen=True)
class DecodeConfig:
    """Launch parameters: a tile holds ``block_n`` tokens (several pages) of ``parallel_heads``
    KV heads side by side (fewer where the model has fewer), and ``num_stages`` sets how far the
    loads run ahead; independent heads in flight are what let a few SMs pull much of HBM. ``tma``
    fetches each page of the tile's heads with one TMA copy (decode_attention_tma.py; a tile is
    then one page, so ``block_n`` must be the cache's block size)."""

    block_n: int
    num_warps: int
    num_stages: int
    min_split_tiles: int
    parallel_heads: int = 8
    tma: bool = False


# Replaces the kernel choice in every launch, so one GPU run can time a configuration end to end
# (throughput runs and result files record it): "block_n,num_warps,num_stages,min_split_tiles,
# parallel_heads[,tma]" forces that Triton configuration, "triton" the Triton kernels with their
# built-in choice, "cuda:warps,stages[,ctas_per_sm[,items_per_warp[,pages_per_stage]]]" the CUDA
# kernel so.
CONFIG_ENV = "NANOFLOW_DECODE_CONFIG"
TRITON_ONLY = "triton"
CUDA_PREFIX = "cuda:"
_forced = os.environ.get(CONFIG_ENV, "")  # read once: launches consult this, not the environment


def force_config(text: str | None) -> None:
    """What ``CONFIG_ENV`` says at start-up, set in a running process (None: the built-in
    choice again). Malformed values raise at the next launch, naming the variable."""
    global _forced
    _forced = text or ""


def forced_config() -> str | None:
    """The forced launch configuration in effect, None where the built-in choice applies."""
    return _forced or None


@functools.lru_cache(maxsize=8)
def parse_cuda_config(text: str) -> cuda_kernel.CudaDecodeConfig:
    """A CudaDecodeConfig from ``CONFIG_ENV``'s ``cuda:`` form; a ValueError names the problem."""
    fields = text[len(CUDA_PREFIX) :].split(",")
    try:
        numbers = [int(f) for f in fields]
    except ValueError:
        numbers = []
    if not 2 <= len(numbers) <= 5 or any(n < 1 for n in numbers):
        raise ValueError(
            f"{CONFIG_ENV}={text!r}: expected cuda:warps,stages[,ctas_per_sm[,items_per_warp"
            "[,pages_per_stage]]] of positive integers"
        )
    return cuda_kernel.CudaDecodeConfig(*numbers)


@functools.lru_cache(maxsize=8)
def parse_config(text: str) -> DecodeConfig:
    """A DecodeConfig from ``CONFIG_ENV``'s format; a ValueError names what is wrong."""
    fields = [f.strip() for f in text.split(",")]
    tma = len(fields) == 6 and fields[5] == "tma"
    if len(fields) not in (5, 6) or (len(fields) == 6 and not tma):
        raise ValueError(
            f"{CONFIG_ENV}={text!r}: expected block_n,num_warps,num_stages,min_split_tiles,"
            "parallel_heads and optionally ',tma'"
        )
    try:
        numbers = [int(f) for f in fields[:5]]
    except ValueError:
        raise ValueError(f"{CONFIG_ENV}={text!r}: the first five fields are integers") from None
    if any(n < 1 for n in numbers):
        raise ValueError(f"{CONFIG_ENV}={text!r}: every field must be positive")
    return DecodeConfig(*numbers, tma=tma)


def decode_config(
    head_dim: int,
    dtype: torch.dtype,
    device: torch.device,
    narrow_cache: bool = False,
    page: int = 16,
    budgeted: bool = False,
    tma: bool = True,
) -> DecodeConfig:
    """The Triton kernels' launch choice (the CUDA kernel, where it applies, is chosen before
    this). On Hopper and later: TMA-fed pages (decode_attention_tma.py), 8 heads per 16-token
    page, which on a budgeted grid read far more than the register-fed kernel; an fp8
    (``narrow_cache``) cache widens each staged page, so a full grid takes fewer heads and more
    stages. Boxes hold 128 rows of a page's heads, so larger pages take fewer heads.
    Before Hopper, or without ``tma`` (caches that are not whole contiguous pages): all of a
    sequence's KV heads (up to 8) in one register-fed tile of 32 tokens, 8 warps; an fp8 cache
    there takes 16 tokens of 4 heads, 4 warps (more spills registers).
    Tiny tiles on CPU so the interpreter exercises every loop. ``CONFIG_ENV`` overrides all."""
    forced = _forced
    if forced and forced != TRITON_ONLY and not forced.startswith(CUDA_PREFIX):
        return parse_config(forced)
    if device.type != "cuda":
        return DecodeConfig(block_n=16, num_warps=4, num_stages=1, min_split_tiles=1)
    if tma and torch.cuda.get_device_capability(device)[0] >= 9:
        heads = max(1, min(8, 128 // page))
        if narrow_cache and not budgeted:
            return DecodeConfig(page, 4, 12, 4, max(1, heads // 2), tma=True)
        return DecodeConfig(page, 8, 8 if narrow_cache else 5, 4, heads, tma=True)
    if narrow_cache:
        return DecodeConfig(
            block_n=16, num_warps=4, num_stages=1, min_split_tiles=4, parallel_heads=4
        )
    block_n = max(16, min(64, 8192 // (head_dim * dtype.itemsize)))
    return DecodeConfig(block_n=block_n, num_warps=8, num_stages=3, min_split_tiles=4)


def check_paged_inputs(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    out: torch.Tensor | None,
) -> None:
    """Shape, dtype and layout checks shared by the decode and prefill attention kernels."""
    if q.dim() != 3:
        raise ValueError(f"q must be [tokens, num_heads, head_dim], got shape {tuple(q.shape)}")
    if k_cache.dim() != 4 or k_cache.shape != v_cache.shape:
        raise ValueError(
            "k_cache and v_cache must both be [num_blocks, num_kv_heads, block_size, head_dim], "
            f"got {tuple(k_cache.shape)} and {tuple(v_cache.shape)}"
        )
    num_heads, head_dim = q.shape[1:]
    num_kv_heads, page, cache_dim = k_cache.shape[1:]
    if cache_dim != head_dim or num_heads % num_kv_heads:
        raise ValueError(
            f"q has {num_heads} heads of {head_dim}; the cache has {num_kv_heads} KV heads of "
            f"{cache_dim}: head_dim must match and num_heads be a multiple of num_kv_heads"
        )
    for name, value in (("head_dim", head_dim), ("block_size", page)):
        if value < 1 or value & (value - 1) or (name == "head_dim" and value < 16):
            raise ValueError(f"{name} must be a power of two (head_dim >= 16), got {value}")
    if k_cache.dtype != v_cache.dtype or k_cache.dtype not in (q.dtype, torch.float8_e4m3fn):
        raise ValueError(
            f"q, k_cache, v_cache dtypes differ: {q.dtype}, {k_cache.dtype}, {v_cache.dtype} "
            "(the caches share one dtype: q's, or float8_e4m3fn)"
        )
    index_dtypes = (torch.int32, torch.int64)
    if block_tables.dim() != 2 or block_tables.dtype not in index_dtypes:
        raise ValueError("block_tables must be a 2-D int32 tensor [batch, max_blocks]")
    if context_lens.dim() != 1 or context_lens.dtype not in index_dtypes:
        raise ValueError("context_lens must be a 1-D int32 tensor [batch]")
    if block_tables.shape[0] != context_lens.shape[0]:
        raise ValueError(
            f"block_tables has {block_tables.shape[0]} rows, context_lens {context_lens.shape[0]}"
        )
    tensors = [q, k_cache, v_cache, block_tables, context_lens]
    if out is not None:
        if out.shape != q.shape or out.dtype != q.dtype:
            raise ValueError(f"out must be {tuple(q.shape)} {q.dtype}, got {tuple(out.shape)}")
        tensors.append(out)
    if any(t.device != q.device for t in tensors):
        raise ValueError("all tensors must be on the same device")
    if any(t.stride(-1) != 1 for t in tensors):
        raise ValueError("the last dimension of every tensor must be contiguous")


@jit
def _kv_tile(
    k_rows, v_rows, table, tokens, end, stride_kb, stride_kt, stride_vb, stride_vt,
    PAGE: tl.constexpr,
):  # fmt: skip
    """K and V of ``tokens`` (zeros from ``end`` on) and the mask of the valid ones; ``k_rows``
    and ``v_rows`` point at the tile's heads and dims."""
    valid = tokens < end
    pages = tl.load(table + tokens // PAGE, mask=valid, other=0).to(tl.int64)
    k_tokens = (pages * stride_kb + (tokens % PAGE) * stride_kt)[None, :, None]
    v_tokens = (pages * stride_vb + (tokens % PAGE) * stride_vt)[None, :, None]
    k = tl.load(k_rows + k_tokens, mask=valid[None, :, None], other=0.0)
    v = tl.load(v_rows + v_tokens, mask=valid[None, :, None], other=0.0)
    return k, v, valid


@jit(do_not_specialize=("num_seqs", "num_splits", "split_len", "stride_tb"))
def _decode_heads_kernel(
    q_ptr, k_ptr, v_ptr, tables_ptr, lens_ptr, out_ptr, part_out_ptr, part_lse_ptr,
    scale_log2, num_seqs, num_heads, num_chunks, num_splits, split_len,
    stride_qb, stride_qh, stride_kb, stride_kh, stride_kt, stride_vb, stride_vh, stride_vt,
    stride_tb, stride_ob, stride_oh,
    HEADS: tl.constexpr, GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, HEAD_DIM: tl.constexpr,
    PAGE: tl.constexpr, BLOCK_N: tl.constexpr, DIRECT: tl.constexpr, NUM_STAGES: tl.constexpr,
    WIDEN: tl.constexpr, WIDE_TYPE: tl.constexpr,
):  # fmt: skip
    """Work item = (sequence, ``HEADS`` KV heads, context split), the heads side by side in one
    3-D tile: one page lookup feeds every head's K/V load and the heads' dots are independent, so
    a single program per SM keeps several heads' loads and math in flight at once.

    ``WIDEN`` (an fp8 cache): the next tile is loaded into registers while this one is widened
    there to ``WIDE_TYPE`` (fp16 for 16-bit queries) and attended. Left to the pipeliner, the
    narrow tiles would be staged in shared memory and read back a byte at a time to build the
    dot operands."""
    kv = tl.arange(0, HEADS)
    rows = tl.arange(0, GROUP_PAD)
    dims = tl.arange(0, HEAD_DIM)
    cols = tl.arange(0, BLOCK_N)
    row_mask = (rows < GROUP)[None, :, None]
    for item in range(tl.program_id(0), num_seqs * num_chunks * num_splits, tl.num_programs(0)):
        split = item % num_splits
        chunk = item // num_splits % num_chunks
        seq = item // num_splits // num_chunks
        start = split * split_len
        end = tl.minimum(start + split_len, tl.load(lens_ptr + seq))
        kv_heads = chunk * HEADS + kv
        heads = (kv_heads * GROUP)[:, None] + rows[None, :]  # [HEADS, GROUP_PAD]
        q = tl.load(
            q_ptr + seq * stride_qb + heads[:, :, None] * stride_qh + dims[None, None, :],
            mask=row_mask,
            other=0.0,
        )
        table = tables_ptr + seq.to(tl.int64) * stride_tb
        k_heads = (kv_heads * stride_kh)[:, None, None] + dims[None, None, :]
        v_heads = (kv_heads * stride_vh)[:, None, None] + dims[None, None, :]
        m_i = tl.full([HEADS, GROUP_PAD], -1e30, tl.float32)
        l_i = tl.zeros([HEADS, GROUP_PAD], tl.float32)
        acc = tl.zeros([HEADS, GROUP_PAD, HEAD_DIM], tl.float32)
        n_tiles = tl.cdiv(tl.maximum(end - start, 0), BLOCK_N)
        k_rows, v_rows = k_ptr + k_heads, v_ptr + v_heads
        if WIDEN:
            q = q.to(WIDE_TYPE)
            k_next, v_next, valid_next = _kv_tile(
                k_rows, v_rows, table, start + cols, end,
                stride_kb, stride_kt, stride_vb, stride_vt, PAGE,
            )  # fmt: skip
            for t in range(0, n_tiles):
                k, v, valid = k_next, v_next, valid_next
                k_next, v_next, valid_next = _kv_tile(
                    k_rows, v_rows, table, start + (t + 1) * BLOCK_N + cols, end,
                    stride_kb, stride_kt, stride_vb, stride_vt, PAGE,
                )  # fmt: skip
                k, v = k.to(WIDE_TYPE), v.to(WIDE_TYPE)
                m_i, l_i, acc = attend_tile(q, k, v, valid, m_i, l_i, acc, scale_log2)
        else:
            for t in tl.range(0, n_tiles, num_stages=NUM_STAGES):
                k, v, valid = _kv_tile(
                    k_rows, v_rows, table, start + t * BLOCK_N + cols, end,
                    stride_kb, stride_kt, stride_vb, stride_vt, PAGE,
                )  # fmt: skip
                m_i, l_i, acc = attend_tile(q, k, v, valid, m_i, l_i, acc, scale_log2)
        o = acc / tl.where(l_i > 0, l_i, 1.0)[:, :, None]
        if DIRECT:
            o_ptrs = out_ptr + seq * stride_ob + heads[:, :, None] * stride_oh + dims[None, None, :]
            tl.store(o_ptrs, o.to(out_ptr.dtype.element_ty), mask=row_mask)
        else:
            store_partial(
                part_out_ptr, part_lse_ptr, o, m_i, l_i, seq, heads, split, num_heads, num_splits,
                HEAD_DIM, GROUP,
            )  # fmt: skip


@jit(do_not_specialize=("num_seqs", "num_splits", "split_len"))
def _decode_reduce_kernel(
    part_out_ptr, part_lse_ptr, lens_ptr, out_ptr, num_seqs, num_heads, num_splits, split_len,
    stride_ob, stride_oh, HEAD_DIM: tl.constexpr, SPLITS_PAD: tl.constexpr,
):  # fmt: skip
    """Combine the splits of one (sequence, head) by their log-sum-exp (base 2)."""
    dims = tl.arange(0, HEAD_DIM)
    splits = tl.arange(0, SPLITS_PAD)
    for item in range(tl.program_id(0), num_seqs * num_heads, tl.num_programs(0)):
        seq = item // num_heads
        used = splits < tl.maximum(tl.cdiv(tl.load(lens_ptr + seq), split_len), 1)
        part = item * num_splits + splits
        lse = tl.load(part_lse_ptr + part, mask=used, other=float("-inf"))
        top = tl.max(lse, 0)
        weight = tl.exp2(lse - tl.where(top == float("-inf"), 0.0, top))
        o = tl.load(part_out_ptr + part[:, None] * HEAD_DIM + dims[None, :], mask=used[:, None])
        total = tl.sum(weight, 0)
        o = tl.sum(tl.where(used[:, None], o, 0.0) * weight[:, None], 0)
        o = o / tl.where(total > 0, total, 1.0)
        o_ptrs = out_ptr + seq * stride_ob + (item % num_heads) * stride_oh + dims
        tl.store(o_ptrs, o.to(out_ptr.dtype.element_ty))


def _work_split(
    batch: int, num_kv_heads: int, max_ctx: int, programs: int, config: DecodeConfig
) -> tuple[int, int, int]:
    """(heads_per_item, num_splits, split_len): the tile's KV heads, then enough context splits
    (combined by the reduce kernel) for about 3 work items per program."""
    heads_per_item = math.gcd(num_kv_heads, next_pow2(config.parallel_heads))
    items = batch * (num_kv_heads // heads_per_item)
    tiles = cdiv(max(max_ctx, 1), config.block_n)
    max_splits = max(1, min(32, tiles // config.min_split_tiles))
    splits = max(1, min(cdiv(3 * programs, items), max_splits))
    split_len = cdiv(tiles, splits) * config.block_n
    return heads_per_item, cdiv(max(max_ctx, 1), split_len), split_len


def _launch_decode(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    num_ctas: int | None,
    out: torch.Tensor,
    config: DecodeConfig,
) -> torch.Tensor:
    batch, num_heads, head_dim = q.shape
    num_kv_heads, page = k_cache.shape[1], k_cache.shape[2]
    programs = num_ctas or sm_count(q.device)
    max_ctx = block_tables.shape[1] * page
    heads_per_item, splits, split_len = _work_split(batch, num_kv_heads, max_ctx, programs, config)
    chunks = num_kv_heads // heads_per_item
    items = batch * chunks * splits
    partials = splits > 1 or config.tma
    if partials:
        part_out = torch.empty(batch, num_heads, splits, head_dim, device=q.device)
        part_lse = torch.empty(batch, num_heads, splits, device=q.device)
    else:
        part_out = part_lse = out
    grid = (min(items, num_ctas or items),)
    if config.tma:
        if config.block_n != page:
            raise ValueError(f"a TMA tile is one page: block_n must be {page}")
        launch_decode_tma(
            q, k_cache, v_cache, block_tables, context_lens, scale * LOG2E, grid[0],
            heads_per_item, splits, split_len, part_out, part_lse, config.num_warps,
            config.num_stages,
        )  # fmt: skip
    else:
        group = num_heads // num_kv_heads
        strides = (
            q.stride(0), q.stride(1), *k_cache.stride()[:3], *v_cache.stride()[:3],
            block_tables.stride(0), out.stride(0), out.stride(1),
        )  # fmt: skip
        shape = dict(
            GROUP=group, GROUP_PAD=max(16, next_pow2(group)), HEAD_DIM=head_dim, PAGE=page,
            BLOCK_N=config.block_n, DIRECT=not partials, NUM_STAGES=config.num_stages,
            WIDEN=k_cache.dtype != q.dtype, num_warps=config.num_warps,
            WIDE_TYPE=tl.float16 if q.element_size() == 2 else tl.float32,
        )  # fmt: skip
        pointers = (q, k_cache, v_cache, block_tables, context_lens, out, part_out, part_lse)
        _decode_heads_kernel[grid](
            *pointers, scale * LOG2E, batch, num_heads, chunks, splits, split_len, *strides,
            HEADS=heads_per_item, **shape,
        )  # fmt: skip
    if partials:
        reduce_splits(part_out, part_lse, context_lens, out, split_len, num_ctas)
    return out


def reduce_splits(
    part_out: torch.Tensor,
    part_lse: torch.Tensor,
    context_lens: torch.Tensor,
    out: torch.Tensor,
    split_len: int,
    num_ctas: int | None,
) -> None:
    """``out`` from the partials of splits of ``split_len`` tokens, by their log-sum-exps."""
    batch, num_heads, splits, head_dim = part_out.shape
    rows = batch * num_heads
    _decode_reduce_kernel[(min(rows, num_ctas or rows),)](
        part_out, part_lse, context_lens, out, batch, num_heads, splits, split_len,
        out.stride(0), out.stride(1), HEAD_DIM=head_dim, SPLITS_PAD=next_pow2(splits),
    )  # fmt: skip


def paged_decode_attention_triton(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    num_ctas: int | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Split-K flash-decoding over the paged cache, all query heads of a KV head in the same
    program so K/V are read once; at most ``num_ctas`` programs (persistent) when given. Never
    reads the context lengths on the host, so it can be captured in a CUDA graph."""
    check_paged_inputs(q, k_cache, v_cache, block_tables, context_lens, out)
    check_num_ctas(num_ctas)
    if out is None:
        out = torch.empty_like(q)
    if q.shape[0] == 0:
        return out
    cuda_config = _cuda_choice(q, k_cache, v_cache, block_tables, context_lens, num_ctas)
    if cuda_config is not None:
        return _launch_decode_cuda(
            q, k_cache, v_cache, block_tables, context_lens, scale, num_ctas, out, cuda_config
        )
    whole_pages = k_cache.is_contiguous() and v_cache.is_contiguous()  # what a TMA box needs
    tma = whole_pages and k_cache.element_size() <= 2  # its tiles are written for 8/16-bit caches
    config = decode_config(
        q.shape[2], q.dtype, q.device, k_cache.dtype != q.dtype, k_cache.shape[2],
        budgeted=num_ctas is not None, tma=tma,
    )  # fmt: skip
    return _launch_decode(
        q, k_cache, v_cache, block_tables, context_lens, scale, num_ctas, out, config
    )


def _cuda_choice(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    num_ctas: int | None = None,
) -> cuda_kernel.CudaDecodeConfig | None:
    """The CUDA kernel's configuration where it applies (and nothing forces Triton), for a
    budget of ``num_ctas`` CTAs or else the SMs the current stream may use."""
    forced = _forced
    if forced and not forced.startswith(CUDA_PREFIX):
        return None
    if not (
        cuda_kernel.available(q.device)
        and cuda_kernel.supports(q, k_cache, v_cache)
        and block_tables.dtype == torch.int32
        and context_lens.dtype == torch.int32
        and block_tables.stride(1) == 1
    ):
        return None
    if forced:
        return parse_cuda_config(forced)
    group = q.shape[1] // k_cache.shape[1]
    sms = num_ctas if num_ctas is not None else cuda_kernel.current_sm_count(q.device)
    return cuda_kernel.default_config(k_cache.element_size(), group, sms)


def _launch_decode_cuda(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    num_ctas: int | None,
    out: torch.Tensor,
    config: cuda_kernel.CudaDecodeConfig,
) -> torch.Tensor:
    batch, num_heads, head_dim = q.shape
    grid = cuda_kernel.grid_size(q.device, num_ctas, config)
    splits, split_pages = cuda_kernel.split_plan(
        batch, k_cache.shape[1], block_tables.shape[1], grid * config.warps, config.items_per_warp
    )
    if splits == 1:
        cuda_kernel.launch_decode_cuda(
            q, k_cache, v_cache, block_tables, context_lens, scale, grid, 1, split_pages, out,
            None, None, config,
        )  # fmt: skip
        return out
    part_out = torch.empty(batch, num_heads, splits, head_dim, device=q.device)
    part_lse = torch.empty(batch, num_heads, splits, device=q.device)
    cuda_kernel.launch_decode_cuda(
        q, k_cache, v_cache, block_tables, context_lens, scale, grid, splits, split_pages, out,
        part_out, part_lse, config,
    )  # fmt: skip
    reduce_splits(part_out, part_lse, context_lens, out, split_pages * cuda_kernel.PAGE, num_ctas)
    return out
