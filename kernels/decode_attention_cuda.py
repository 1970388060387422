"""Launcher of the CUDA C++ paged decode attention (kernels/cuda/decode_attention.cu).

The kernel is compiled at run time by NVRTC through CuPy, once per shape family, and launched on
torch's current stream (CUDA graphs capture it like any other launch). It fills either the
output or per-split partials; ``decode_attention.py`` owns the split reduction and the choice
between this kernel and the Triton ones. Needs CuPy and an SM 8.9+ GPU; everything here is
importable without either.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

SOURCE = Path(__file__).with_name("cuda") / "decode_attention.cu"
PAGE = 16
HEAD_DIM = 128
MAX_GROUP = 8  # query heads per KV head that one MMA column block holds
# GQA groups the engine sends here: those checked against the reference on a GPU (the kernel
# compiles for any group up to MAX_GROUP; the others go to the Triton kernels until checked)
CHECKED_GROUPS = frozenset({4})
SMEM_PER_SM = 227 * 1024  # the opt-in maximum of one SM on Hopper


@dataclass(frozen=True)
class CudaDecodeConfig:
    """``warps`` per CTA, each streaming work items through ``stages`` shared-memory stages of
    ``pages_per_stage`` pages (several pages per step give a warp independent chains of MMAs
    to interleave); ``ctas_per_sm`` CTAs share an SM (their rings together bound the bytes in
    flight); warps draw (sequence, KV head, split) items from a counter, and contexts are
    split only as far as needed for about ``items_per_warp`` items per warp: a split costs a
    partial output and a reduction."""

    warps: int
    stages: int
    ctas_per_sm: int = 1
    items_per_warp: int = 4
    pages_per_stage: int = 1


def stage_bytes(kv_elt: int, group: int, pages: int = 1) -> int:
    page = PAGE * HEAD_DIM * kv_elt
    q_bytes = group * HEAD_DIM * 2
    return 2 * pages * page + -(-q_bytes // 128) * 128


def smem_bytes(config: CudaDecodeConfig, kv_elt: int, group: int) -> int:
    """The stage rings, and each warp's queue of (item, length) pairs."""
    per_stage = stage_bytes(kv_elt, group, config.pages_per_stage)
    queue = 2 * 4 * (config.stages + 1)
    return config.warps * (config.stages * per_stage + queue)


FEW_SMS = 48  # budgets at or below this many SMs take the fp8 configuration for few SMs


def default_config(kv_elt: int, group: int, sms: int | None = None) -> CudaDecodeConfig:
    """The launch measured fastest on the H200 for a budget of ``sms`` SMs (None: the whole
    GPU). Each page goes through shared memory twice (copied in, read out), so a 16-bit cache
    on few SMs is bound by shared-memory bandwidth and wants as many warps as hold a two-stage
    ring (12). An fp8 page costs as much work for half the bytes: on few SMs 16 warps of a page
    a step hide its latency best; on many, 8 warps of two pages a step with the deepest ring."""

    def deepest(warps: int, pages: int) -> int:
        return SMEM_PER_SM // (warps * stage_bytes(kv_elt, group, pages))

    if kv_elt == 2:
        warps = 12 if deepest(12, 1) >= 2 else 8
        return CudaDecodeConfig(warps=warps, stages=max(2, min(deepest(warps, 1), 8)))
    if sms is not None and sms <= FEW_SMS:
        return CudaDecodeConfig(warps=16, stages=2)
    return CudaDecodeConfig(warps=8, stages=max(2, min(deepest(8, 2), 8)), pages_per_stage=2)


@functools.cache
def _cupy() -> Any:
    try:
        import cupy
    except ImportError:
        return None
    return cupy


def available(device: torch.device) -> bool:
    """CuPy importable and a GPU with the instructions the kernel uses (fp8 widening: SM 8.9)."""
    if device.type != "cuda" or _cupy() is None:
        return False
    return torch.cuda.get_device_capability(device) >= (8, 9)


def supports(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    groups: frozenset[int] = CHECKED_GROUPS,
) -> bool:
    """The shapes and layouts the kernel is written for, in ``groups``; others go to the
    Triton kernels."""
    num_heads, head_dim = q.shape[1:]
    num_kv_heads, page, _ = k_cache.shape[1:]
    group = num_heads // num_kv_heads
    kv_ok = k_cache.dtype == q.dtype or k_cache.dtype == torch.float8_e4m3fn
    return (
        head_dim == HEAD_DIM
        and page == PAGE
        and group in groups
        and 1 <= group <= MAX_GROUP
        and q.dtype in (torch.bfloat16, torch.float16)
        and kv_ok
        and q.stride(2) == 1
        and q.stride(1) == head_dim
        and q.stride(0) % 8 == 0
        and q.data_ptr() % 16 == 0
        and all(
            c.stride(3) == 1 and c.stride(2) == head_dim and c.data_ptr() % 16 == 0
            for c in (k_cache, v_cache)
        )
        and all(c.stride(0) * c.element_size() % 16 == 0 for c in (k_cache, v_cache))
        and all(c.stride(1) * c.element_size() % 16 == 0 for c in (k_cache, v_cache))
    )


MIN_SPLIT_PAGES = 8


def split_plan(
    batch: int, num_kv_heads: int, table_width: int, total_warps: int, items_per_warp: int
) -> tuple[int, int]:
    """(num_splits, split_pages): one split per (sequence, KV head) when they alone give every
    warp about ``items_per_warp`` items, more for small batches. Computed from the table's
    width, never the lengths, so a CUDA graph replays it; the kernel skips splits past the
    step's longest context."""
    pages = max(table_width, 1)
    pairs = max(batch * num_kv_heads, 1)
    splits = max(1, min(-(-items_per_warp * total_warps // pairs), pages // MIN_SPLIT_PAGES))
    split_pages = -(-pages // splits)
    return -(-pages // split_pages), split_pages


_KV_KINDS = {torch.bfloat16: 2, torch.float16: 2, torch.float8_e4m3fn: 1}


@functools.cache
def _kernel(kv_elt: int, q_f16: bool, group: int, config: CudaDecodeConfig, device: int) -> Any:
    """The compiled kernel of one instantiation, with its shared memory opted in."""
    cupy = _cupy()
    name = (
        f"decode_attention_kernel<{HEAD_DIM},{kv_elt},{'true' if q_f16 else 'false'},"
        f"{group},{config.warps},{config.stages},{config.pages_per_stage}>"
    )
    with cupy.cuda.Device(device):
        module = cupy.RawModule(
            code=SOURCE.read_text(), options=("-std=c++17",), name_expressions=[name]
        )
        kernel = module.get_function(name)
        kernel.max_dynamic_shared_size_bytes = smem_bytes(config, kv_elt, group)
    return kernel


@functools.cache
def _read_kernel(unroll: int, threads: int, ctas_per_sm: int, device: int) -> Any:
    cupy = _cupy()
    name = f"stream_read_kernel<{unroll},{threads},{ctas_per_sm}>"
    with cupy.cuda.Device(device):
        module = cupy.RawModule(
            code=SOURCE.read_text(), options=("-std=c++17",), name_expressions=[name]
        )
        return module.get_function(name)


@functools.cache
def _external_stream(handle: int, device: int) -> Any:
    return _cupy().cuda.ExternalStream(handle, device)


@functools.cache
def _stream_sm_count(handle: int, device: int) -> int:
    """SMs a stream's kernels can use: its green context's partition, else the whole GPU."""
    total = torch.cuda.get_device_properties(device).multi_processor_count
    try:
        from cuda.bindings import driver
    except ImportError:
        return total
    err, green = driver.cuStreamGetGreenCtx(driver.CUstream(handle))
    if err != driver.CUresult.CUDA_SUCCESS or not int(green):
        return total
    err, resource = driver.cuGreenCtxGetDevResource(
        green, driver.CUdevResourceType.CU_DEV_RESOURCE_TYPE_SM
    )
    return resource.sm.smCount if err == driver.CUresult.CUDA_SUCCESS else total


def current_sm_count(device: torch.device) -> int:
    index = device.index if device.index is not None else torch.cuda.current_device()
    return _stream_sm_count(torch.cuda.current_stream(device).cuda_stream, index)


def grid_size(device: torch.device, num_ctas: int | None, config: CudaDecodeConfig) -> int:
    """A CTA budget as given; otherwise every SM the current stream may use, filled."""
    return num_ctas if num_ctas is not None else current_sm_count(device) * config.ctas_per_sm


def _launch(kernel: Any, grid: int, threads: int, smem: int, args: tuple, device: int) -> None:
    stream = _external_stream(torch.cuda.current_stream(device).cuda_stream, device)
    with stream:
        kernel((grid,), (threads,), args, shared_mem=smem)


def launch_decode_cuda(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    grid: int,
    splits: int,
    split_pages: int,
    out: torch.Tensor,
    part_out: torch.Tensor | None,
    part_lse: torch.Tensor | None,
    config: CudaDecodeConfig,
) -> None:
    """Fill ``out`` (one split) or ``part_out`` / ``part_lse`` (several) on the current stream.
    ``block_tables`` and ``context_lens`` must be int32. Each launch draws its work from a
    counter of its own, so launches on several streams never share one."""
    batch, num_heads, _ = q.shape
    num_kv_heads = k_cache.shape[1]
    group = num_heads // num_kv_heads
    kv_elt = _KV_KINDS[k_cache.dtype]
    device = q.device.index if q.device.index is not None else torch.cuda.current_device()
    kernel = _kernel(kv_elt, q.dtype == torch.float16, group, config, device)
    direct = splits == 1
    counter = torch.zeros(1, dtype=torch.int32, device=q.device)
    ptr = np.uint64
    args = (
        ptr(q.data_ptr()), ptr(k_cache.data_ptr()), ptr(v_cache.data_ptr()),
        ptr(block_tables.data_ptr()), ptr(context_lens.data_ptr()), ptr(out.data_ptr()),
        ptr(0 if direct else part_out.data_ptr()), ptr(0 if direct else part_lse.data_ptr()),
        ptr(counter.data_ptr()), np.float32(scale * math.log2(math.e)), np.int32(batch),
        np.int32(num_kv_heads),
        np.int32(splits), np.int32(split_pages), np.int32(block_tables.shape[1]),
        np.int64(q.stride(0)), np.int64(k_cache.stride(0)), np.int64(k_cache.stride(1)),
        np.int64(v_cache.stride(0)), np.int64(v_cache.stride(1)), np.int64(block_tables.stride(0)),
        np.int64(out.stride(0)), np.int64(out.stride(1)), np.int32(direct),
    )  # fmt: skip
    smem = smem_bytes(config, kv_elt, group)
    _launch(kernel, grid, config.warps * 32, smem, args, device)


def stream_read(
    src: torch.Tensor, sink: torch.Tensor, grid: int, threads: int, unroll: int, ctas_per_sm: int
) -> None:
    """Read every byte of ``src`` (16-byte aligned, a multiple of 16 bytes) once with ``grid``
    CTAs of ``threads``, compiled to fit ``ctas_per_sm`` CTAs on an SM; ``sink`` (at least
    grid * threads * 16 bytes) receives the XOR of what each thread read. The ceiling a
    memory-bound kernel on that many SMs is measured against."""
    if (
        src.numel() * src.element_size() % 16
        or sink.numel() * sink.element_size() < grid * threads * 16
    ):
        raise ValueError("src must be whole 16-byte units and sink hold 16 bytes per thread")
    device = src.device.index if src.device.index is not None else torch.cuda.current_device()
    n16 = src.numel() * src.element_size() // 16
    args = (np.uint64(src.data_ptr()), np.int64(n16), np.uint64(sink.data_ptr()))
    _launch(_read_kernel(unroll, threads, ctas_per_sm, device), grid, threads, 0, args, device)
