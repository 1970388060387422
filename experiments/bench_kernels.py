"""Kernel benchmark, one GPU call: ceilings, bf16 correctness, and every Triton kernel timed.

1. Ceilings measured in the same run: device copy bandwidth (bytes read + written) and cuBLAS bf16
   GEMM TFLOP/s (8192^3).
2. Every Triton kernel against its PyTorch reference in bf16 (relative error; > 2e-2 fails).
3. Llama-3-8B shapes (32 q / 8 kv heads, head_dim 128, hidden 4096, intermediate 14336, block 16):
   decode attention (GB/s of K/V read, fraction of copy bandwidth) at 25/50/75/100% of the SMs and
   the full grid; prefill attention vs SDPA's flash backend; the memory-bound kernels; the
   persistent GEMM vs cuBLAS under an SM carveout and vs full-GPU cuBLAS; small sweeps of the launch
   configurations, so the defaults can be retuned from one run.

Usage: python experiments/bench_kernels.py [--out DIR]
Without a GPU it is a dry run: tiny shapes, fp32, Triton's interpreter, host-clock timings.
Writes DIR/<gpu>/kernels/<label>.json (DIR defaults to experiments/results); exits 1 if a check
failed or a section raised (the rest still runs).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, astuple, dataclass
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

GPU = torch.cuda.is_available()
if not GPU:  # a dry run: the kernels run in Triton's interpreter (set before they are defined)
    os.environ.setdefault("TRITON_INTERPRET", "1")

import triton  # noqa: E402
from common import add_out_argument, write_result  # noqa: E402

from nanoflow.kernels._compat import sm_count  # noqa: E402
from nanoflow.kernels.activation import silu_and_mul_ref, silu_and_mul_triton  # noqa: E402
from nanoflow.kernels.decode_attention import (  # noqa: E402
    DecodeConfig,
    _launch_decode,
    decode_config,
    forced_config,
    paged_decode_attention_ref,
    paged_decode_attention_triton,
)
from nanoflow.kernels.gemm import _GPU_CONFIGS, _launch_linear, linear_ref, linear_triton  # noqa: E402
from nanoflow.kernels.norm import rms_norm_ref, rms_norm_triton  # noqa: E402
from nanoflow.kernels.prefill_attention import (  # noqa: E402
    PrefillConfig,
    _launch_prefill,
    paged_prefill_attention_ref,
    paged_prefill_attention_triton,
)
from nanoflow.kernels.rotary import rope_kv_write_ref, rope_kv_write_triton  # noqa: E402
from nanoflow.measure import time_cuda  # noqa: E402
from nanoflow.runtime.graph import DECODE_ATTENTION  # noqa: E402
from nanoflow.runtime.ops import Resource  # noqa: E402
from nanoflow.runtime.schedule import Mechanism, PipelineSchedule, UnitSpec  # noqa: E402
from nanoflow.runtime.units import build_units  # noqa: E402

DEVICE = torch.device("cuda" if GPU else "cpu")
DTYPE = torch.bfloat16 if GPU else torch.float32
TOLERANCE = 2e-2


@dataclass(frozen=True)
class Sizes:
    heads: int
    kv_heads: int
    head_dim: int
    hidden: int
    intermediate: int
    page: int
    decode_batch: int
    decode_ctx: tuple[int, ...]
    prefill: tuple[tuple[int, int], ...]  # (prompts, length), causal from an empty cache
    prefix_chunk: tuple[int, int, int]  # (chunks, chunk length, context incl. the chunk)
    tokens: tuple[int, ...]
    linear_m: tuple[int, ...]
    linear_kn: tuple[tuple[int, int], ...]
    gemm_n: int
    copy_elems: int


LLAMA3_8B = Sizes(
    heads=32,
    kv_heads=8,
    head_dim=128,
    hidden=4096,
    intermediate=14336,
    page=16,
    decode_batch=256,
    decode_ctx=(1024, 2048, 4096),
    prefill=((8, 1024), (2, 4096)),
    prefix_chunk=(4, 512, 4096),
    tokens=(2048, 4096, 8192),
    linear_m=(256, 1024, 2048),
    linear_kn=((4096, 6144), (4096, 28672), (14336, 4096)),
    gemm_n=8192,
    copy_elems=2**30,
)
DRY_RUN = Sizes(
    4, 2, 64, 64, 96, 16, 3, (20, 40), ((2, 24),), (1, 8, 40), (8,), (8,), ((64, 48),), 64, 2**16
)
SIZES = LLAMA3_8B if GPU else DRY_RUN
RESULTS: dict[str, Any] = {"checks": [], "errors": {}, "section_seconds": {}}


def bench_ms(fn: Callable[[], Any]) -> float:
    """Median GPU milliseconds, L2 flushed before each run and the stream held while ``fn`` is
    launched: a kernel shorter than its Python wrapper is timed as it runs (as a CUDA graph
    replays it), not as its launch, which ``do_bench`` measured for 2048-token norms. About
    60 ms of runs; the host clock on CPU."""
    if GPU:
        once = time_cuda(fn, iters=3, queue_ahead=True)
        iters = max(5, min(100, int(0.06 / max(once, 1e-6))))
        return time_cuda(fn, iters=iters, warmup=2, queue_ahead=True, flush_l2=True) * 1e3
    fn()
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1e3


def budgets() -> list[int | None]:
    """25/50/75/100% of the SMs, then the unbudgeted (full) grid."""
    sms = sm_count(DEVICE)
    return [max(1, round(sms * f)) for f in (0.25, 0.5, 0.75, 1.0)] + [None]


def randn(*shape: int, dtype: torch.dtype = DTYPE) -> torch.Tensor:
    return torch.randn(*shape, device=DEVICE, dtype=dtype)


def ints(values: Any) -> torch.Tensor:
    return torch.as_tensor(values, dtype=torch.int32, device=DEVICE)


def copy_fraction(gbs: float) -> float | None:
    copy = RESULTS.get("ceilings", {}).get("copy_gbs")
    return round(gbs / copy, 3) if copy else None


def check(name: str, out: torch.Tensor, ref: torch.Tensor) -> None:
    """Record max |out - ref| / max |ref|."""
    err = ((out.float() - ref.float()).abs().max() / ref.float().abs().max().clamp_min(1e-6)).item()
    ok = math.isfinite(err) and err <= TOLERANCE
    RESULTS["checks"].append({"name": name, "rel_err": err, "ok": ok})
    print(f"  check {name:<44} rel err {err:.2e}  {'ok' if ok else '*** FAIL ***'}")


def paged(lens: list[int]) -> tuple[torch.Tensor, ...]:
    """K/V caches holding ``lens`` tokens per sequence and their (shuffled) block tables."""
    width = max(1, *(-(-n // SIZES.page) for n in lens))
    blocks = len(lens) * width
    k_cache = randn(blocks, SIZES.kv_heads, SIZES.page, SIZES.head_dim)
    v_cache = randn(blocks, SIZES.kv_heads, SIZES.page, SIZES.head_dim)
    order = torch.randperm(blocks, device=DEVICE).view(len(lens), width)
    return k_cache, v_cache, order.to(torch.int32)


# ---- 1. ceilings ----------------------------------------------------------------------------


def ceilings() -> dict[str, float]:
    src = randn(SIZES.copy_elems, dtype=torch.bfloat16)
    copy_ms = bench_ms(partial(torch.Tensor.copy_, torch.empty_like(src), src))
    copy_gbs = 2 * src.numel() * src.element_size() / copy_ms / 1e6  # read + written
    del src
    n = SIZES.gemm_n
    a, b = randn(n, n, dtype=torch.bfloat16), randn(n, n, dtype=torch.bfloat16)
    tflops = 2 * n**3 / bench_ms(partial(torch.mm, a, b)) / 1e9
    return {"copy_gbs": round(copy_gbs, 1), "gemm_bf16_tflops": round(tflops, 1)}


# ---- 2. correctness -------------------------------------------------------------------------


def check_attention() -> None:
    s, scale = SIZES, SIZES.head_dim**-0.5
    lens = [1, 15, 17, 100, 1000, 3000, 16, 33] if GPU else [1, 15, 17, 40]
    k_cache, v_cache, tables = paged(lens)
    qkv = randn(len(lens), (s.heads + 2 * s.kv_heads) * s.head_dim)
    q = qkv[:, : s.heads * s.head_dim].unflatten(1, (s.heads, s.head_dim))  # strided, as in a model
    expected = paged_decode_attention_ref(q, k_cache, v_cache, tables, ints(lens), scale)
    for n in (None, budgets()[0], 5):
        out = paged_decode_attention_triton(q, k_cache, v_cache, tables, ints(lens), scale, n)
        check(f"decode ctx {min(lens)}..{max(lens)} num_ctas={n}", out, expected)
    q_lens = [1000, 1, 37, 0, 200] if GPU else [20, 1, 0, 9]
    ctx_lens = [1000, 501, 37, 5, 2200] if GPU else [20, 30, 5, 40]
    k_cache, v_cache, tables = paged(ctx_lens)
    q = randn(sum(q_lens), s.heads, s.head_dim)
    cu = ints([0, *torch.tensor(q_lens).cumsum(0).tolist()])
    args = (q, k_cache, v_cache, tables, cu, ints(ctx_lens), max(q_lens), scale)
    expected = paged_prefill_attention_ref(*args)
    for n in (None, budgets()[0]):
        check(
            f"prefill chunks with prefixes num_ctas={n}",
            paged_prefill_attention_triton(*args, n),
            expected,
        )


def check_pointwise() -> None:
    s, t = SIZES, 300 if GPU else 5
    x, residual, weight = randn(t, s.hidden), randn(t, s.hidden), randn(s.hidden)
    res_ref = residual.clone()
    out = rms_norm_triton(x, weight, 1e-5, residual)
    check("rms_norm + residual", out, rms_norm_ref(x, weight, 1e-5, res_ref))
    check("rms_norm residual update", residual, res_ref)
    check("rms_norm", rms_norm_triton(x, weight, 1e-5), rms_norm_ref(x, weight, 1e-5))
    qkv = randn(t, (s.heads + 2 * s.kv_heads) * s.head_dim)
    q, k, v = qkv.split([s.heads * s.head_dim, s.kv_heads * s.head_dim, s.kv_heads * s.head_dim], 1)
    q, k, v = (a.unflatten(1, (-1, s.head_dim)) for a in (q, k, v))
    positions = torch.randint(0, 4096, (t,), device=DEVICE)
    cos_sin = randn(4096, s.head_dim, dtype=torch.float32)
    slots = torch.randperm(t * 2, device=DEVICE)[:t]
    caches = [
        torch.zeros(-(-2 * t // s.page), s.kv_heads, s.page, s.head_dim, device=DEVICE, dtype=DTYPE)
        for _ in range(4)
    ]
    q_ref = q.clone()
    rope_kv_write_triton(q, k, v, positions, cos_sin, caches[0], caches[1], slots)
    rope_kv_write_ref(q_ref, k, v, positions, cos_sin, caches[2], caches[3], slots)
    check("rope q", q, q_ref)
    check("rope k cache", caches[0], caches[2])
    check("rope v cache", caches[1], caches[3])
    x = randn(t, 2 * s.intermediate)
    check("silu_and_mul", silu_and_mul_triton(x), silu_and_mul_ref(x))


def check_linear() -> None:
    k, n = SIZES.linear_kn[0]
    for m in (1, 300, 2048) if GPU else (1, 7):
        x, w, bias = randn(m, k), randn(n, k) / k**0.5, randn(n)
        for num_ctas in (None, budgets()[0]):
            check(
                f"linear {m}x{k}->{n} num_ctas={num_ctas}",
                linear_triton(x, w, None, num_ctas),
                linear_ref(x, w),
            )
        check(f"linear {m}x{k}->{n} + bias", linear_triton(x, w, bias), linear_ref(x, w, bias))
    k, n = SIZES.linear_kn[-1]
    x, w = randn(256 if GPU else 5, k), randn(n, k) / k**0.5
    check(f"linear 256x{k}->{n}", linear_triton(x, w), linear_ref(x, w))


# ---- 3. timings -----------------------------------------------------------------------------


def bandwidth_row(fn: Callable[[], Any], nbytes: float, **fields: Any) -> dict[str, Any]:
    ms = bench_ms(fn)
    gbs = nbytes / ms / 1e6
    return {**fields, "ms": round(ms, 4), "gbs": round(gbs, 1), "frac_copy_bw": copy_fraction(gbs)}


def flops_row(fn: Callable[[], Any], flops: float, **fields: Any) -> dict[str, Any]:
    ms = bench_ms(fn)
    return {**fields, "ms": round(ms, 4), "tflops": round(flops / ms / 1e9, 1)}


def sweep_configs(*rows: tuple[int, ...]) -> list[DecodeConfig]:
    """Decode launch configurations (block_n, num_warps, num_stages, min_split_tiles,
    parallel_heads[, tma]) to time on the GPU; one small one of the same kind for the CPU dry
    run."""
    if GPU:
        return [DecodeConfig(*r) for r in rows]
    tma = any(len(r) > 5 and r[5] for r in rows)
    return [DecodeConfig(16, 4, 2 if tma else 1, 1, 2, tma)]


# 5 and 7 stages give the K/V loads two and three buffers
DECODE_SWEEP = sweep_configs(
    (32, 8, 3, 4, 8), (16, 8, 5, 4, 8), (16, 4, 5, 4, 8), (32, 8, 5, 4, 4), (32, 4, 5, 4, 4),
    (32, 8, 7, 4, 4), (16, 8, 7, 4, 4), (64, 8, 5, 4, 2), (32, 8, 7, 4, 2),
)  # fmt: skip


def decode_attention() -> dict[str, Any]:
    s, scale, batch = SIZES, SIZES.head_dim**-0.5, SIZES.decode_batch
    k_cache, v_cache, order = paged([max(s.decode_ctx)] * batch)
    q = randn(batch, s.heads, s.head_dim)
    out = torch.empty_like(q)
    rows = []
    for ctx in s.decode_ctx:  # ascending: the sweep below reuses the longest context's inputs
        tables = order.flatten()[: batch * -(-ctx // s.page)].view(batch, -1)
        args = (q, k_cache, v_cache, tables, ints([ctx] * batch), scale)
        kv_bytes = 2 * batch * ctx * s.kv_heads * s.head_dim * q.element_size()
        reference = paged_decode_attention_ref(*args) if ctx == s.decode_ctx[0] else None
        for n in budgets():
            fn = partial(paged_decode_attention_triton, *args, n, out)
            rows.append(bandwidth_row(fn, kv_bytes, context=ctx, batch=batch, num_ctas=n))
            if reference is not None and n in (budgets()[0], None):  # the big-batch work split
                check(f"decode batch {batch} ctx {ctx} num_ctas={n}", fn(), reference)
    default = decode_config(s.head_dim, DTYPE, DEVICE)
    reference = paged_decode_attention_ref(*args)
    sweep = []
    for config in [default, *DECODE_SWEEP]:
        for n in (budgets()[0], None):
            fn = partial(_launch_decode, *args, n, out, config)
            try:
                row = bandwidth_row(fn, kv_bytes, **asdict(config), context=ctx, num_ctas=n)
            except triton.runtime.errors.OutOfResources as err:  # too much shared memory
                print(f"  skip {config}: {err}")
                break
            sweep.append(row)
            check(f"decode sweep {astuple(config)} num_ctas={n}", fn(), reference)
    return {"rows": rows, "default_config": asdict(default), "config_sweep": sweep}


# an fp8 cache's tiles are prefetched one ahead in registers (num_stages does not apply): larger
# tiles than 16 tokens of 4 heads (at 4 warps) spill registers on sm_90
# and TMA-fed pages (decode_attention_tma.py), staged 3-5 deep in shared memory
FP8_SWEEP = sweep_configs(
    (16, 8, 1, 4, 4), (16, 4, 1, 4, 2), (16, 4, 1, 8, 4), (16, 8, 1, 4, 2),
    (16, 4, 8, 4, 4, True), (16, 4, 12, 4, 4, True), (16, 8, 8, 4, 8, True),
)  # fmt: skip


def _decode_sweep(
    name: str, cache_dtype: torch.dtype, default: DecodeConfig, configs: list[DecodeConfig]
) -> dict[str, Any]:
    """Fraction of copy bandwidth of each launch configuration, batch 256 at every context, on a
    quarter and half of the SMs and the full grid; each checked against the reference."""
    s, scale, batch = SIZES, SIZES.head_dim**-0.5, SIZES.decode_batch
    k_wide, v_wide, order = paged([max(s.decode_ctx)] * batch)
    k_cache, v_cache = k_wide.to(cache_dtype), v_wide.to(cache_dtype)
    del k_wide, v_wide
    q = randn(batch, s.heads, s.head_dim)
    out = torch.empty_like(q)
    rows = []
    for ctx in s.decode_ctx:
        tables = order.flatten()[: batch * -(-ctx // s.page)].view(batch, -1)
        args = (q, k_cache, v_cache, tables, ints([ctx] * batch), scale)
        kv_bytes = 2 * batch * ctx * s.kv_heads * s.head_dim * k_cache.element_size()
        reference = paged_decode_attention_ref(*args) if ctx == s.decode_ctx[0] else None
        for config in [default, *configs]:
            for n in (*budgets()[:2], None):
                fn = partial(_launch_decode, *args, n, out, config)
                try:
                    row = bandwidth_row(fn, kv_bytes, **asdict(config), context=ctx, num_ctas=n)
                except triton.runtime.errors.OutOfResources as err:
                    print(f"  skip {config}: {err}")
                    break
                rows.append(row)
                if reference is not None:
                    check(f"decode {name} {astuple(config)} num_ctas={n}", fn(), reference)
    return {"default_config": asdict(default), "rows": rows}


def decode_attention_fp8() -> dict[str, Any]:
    """Decode attention over an fp8 (e4m3) cache: a token's K/V are half the bytes of bf16, so
    each tile of a given token count carries half the bytes in flight."""
    default = decode_config(SIZES.head_dim, DTYPE, DEVICE, narrow_cache=True)
    return _decode_sweep("fp8", torch.float8_e4m3fn, default, FP8_SWEEP)


# TMA-fed tiles of one page (16 tokens): 8 or 4 heads per copy, stages past the page-table load
# become buffers (5 stages: 2 buffers of 8 heads; 8/10/12 stages: 3/4/5 buffers of 4 heads)
TMA_SWEEP = sweep_configs(
    (16, 8, 5, 4, 8, True), (16, 4, 8, 4, 4, True), (16, 4, 10, 4, 4, True),
    (16, 4, 12, 4, 4, True), (16, 8, 12, 4, 4, True),
)  # fmt: skip


def decode_attention_tma() -> dict[str, Any]:
    """The TMA-fed decode kernel beside the default one, on the cache of the model's dtype: a
    candidate for the quarter of the SMs the pipeline leaves decode attention."""
    default = decode_config(SIZES.head_dim, DTYPE, DEVICE)
    return _decode_sweep("tma", DTYPE, default, TMA_SWEEP)


# Configurations small enough in shared memory for several programs per SM (a green context
# confines a full grid to its SMs, so those programs stay there).
GREEN_SWEEP = sweep_configs(
    (16, 8, 3, 4, 8), (32, 4, 3, 4, 4), (16, 4, 3, 4, 4), (16, 4, 3, 4, 2), (32, 4, 3, 4, 2),
    (64, 4, 3, 4, 1),
)  # fmt: skip
GREEN_SMS = 32


def decode_green_context() -> dict[str, Any]:
    """Decode attention on a quarter of the SMs enforced in hardware: a green context of 32 SMs
    running a full grid, where shared-memory-light programs can share an SM; beside it, a plain
    device copy in the same partition, the bandwidth those SMs can pull at all."""
    schedule = PipelineSchedule(
        units=(UnitSpec("memory", GREEN_SMS), UnitSpec("rest")),
        op_units={r.value: "memory" for r in Resource},
        mechanism=Mechanism.GREEN_CONTEXT,
    )
    unit = build_units(schedule, DEVICE)["memory"]
    s, scale, batch, ctx = SIZES, SIZES.head_dim**-0.5, SIZES.decode_batch, SIZES.decode_ctx[0]
    k_cache, v_cache, tables = paged([ctx] * batch)
    q = randn(batch, s.heads, s.head_dim)
    out = torch.empty_like(q)
    args = (q, k_cache, v_cache, tables, ints([ctx] * batch), scale)
    kv_bytes = 2 * batch * ctx * s.kv_heads * s.head_dim * q.element_size()
    reference = paged_decode_attention_ref(*args)
    rows = []
    default = decode_config(s.head_dim, DTYPE, DEVICE)
    with torch.cuda.stream(unit.stream):
        src = randn(SIZES.copy_elems // 4, dtype=torch.bfloat16)
        copy = partial(torch.Tensor.copy_, torch.empty_like(src), src)
        copy_row = bandwidth_row(copy, 2 * src.numel() * src.element_size(), sms=unit.num_sms)
        del src
        for config in [default, *GREEN_SWEEP]:
            fn = partial(_launch_decode, *args, None, out, config)
            rows.append(
                bandwidth_row(fn, kv_bytes, **asdict(config), context=ctx, sms=unit.num_sms)
            )
            check(f"decode green {astuple(config)}", fn(), reference)
    return {"sms": unit.num_sms, "copy": copy_row, "rows": rows}


def prefill_flops(q_len: int, ctx: int) -> float:
    """Causal FLOPs of one chunk: its query i sees ctx - q_len + i + 1 keys."""
    keys = q_len * (ctx - q_len) + q_len * (q_len + 1) / 2
    return 4 * SIZES.heads * SIZES.head_dim * keys


def prefill_inputs(chunks: int, q_len: int, ctx: int) -> tuple[Any, ...]:
    k_cache, v_cache, tables = paged([ctx] * chunks)
    q = randn(chunks * q_len, SIZES.heads, SIZES.head_dim)
    cu = torch.arange(0, chunks * q_len + 1, q_len, device=DEVICE, dtype=torch.int32)
    return q, k_cache, v_cache, tables, cu, ints([ctx] * chunks), q_len, SIZES.head_dim**-0.5


def sdpa_flash(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    backend = SDPBackend.FLASH_ATTENTION if GPU else SDPBackend.MATH
    with sdpa_kernel(backend):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)


def prefill_attention() -> dict[str, Any]:
    s, rows = SIZES, []
    cases = [(n, length, length) for n, length in s.prefill] + [s.prefix_chunk]
    for chunks, q_len, ctx in cases:
        args = prefill_inputs(chunks, q_len, ctx)
        flops = chunks * prefill_flops(q_len, ctx)
        shape = f"{chunks}x{q_len} ctx {ctx}"
        for n in budgets():
            fn = partial(paged_prefill_attention_triton, *args, n)
            rows.append(flops_row(fn, flops, shape=shape, impl="triton", num_ctas=n))
        if q_len == ctx:  # SDPA's causal mask has no cached prefix
            qkv = [randn(chunks, s.heads, q_len, s.head_dim) for _ in range(3)]
            fn = partial(sdpa_flash, *qkv)
            rows.append(flops_row(fn, flops, shape=shape, impl="sdpa_flash", num_ctas=None))
    chunks, q_len = s.prefill[0]
    args = prefill_inputs(chunks, q_len, q_len)
    shapes = [(128, 64, 8, 3), (128, 128, 8, 3), (128, 64, 4, 3), (64, 64, 4, 4)] if GPU else []
    sweep = []
    for config in (PrefillConfig(*shape) for shape in shapes):
        fn = partial(_launch_prefill, *args, None, torch.empty_like(args[0]), config)
        sweep.append(flops_row(fn, chunks * prefill_flops(q_len, q_len), **asdict(config)))
    return {"rows": rows, "config_sweep": sweep}


def memory_bound_cases(
    t: int,
) -> dict[str, tuple[float, Callable[..., Any], Callable[..., Any], tuple]]:
    """name: (bytes moved, Triton kernel, reference, arguments) at ``t`` tokens."""
    s = SIZES
    x, residual, weight = randn(t, s.hidden), randn(t, s.hidden), randn(s.hidden)
    qkv = randn(t, (s.heads + 2 * s.kv_heads) * s.head_dim)
    q, k, v = qkv.split([s.heads * s.head_dim, s.kv_heads * s.head_dim, s.kv_heads * s.head_dim], 1)
    q, k, v = (a.unflatten(1, (-1, s.head_dim)) for a in (q, k, v))
    positions = torch.randint(0, 8192, (t,), device=DEVICE)
    cos_sin = randn(8192, s.head_dim, dtype=torch.float32)
    blocks = -(-t // s.page)
    k_cache = torch.empty(blocks, s.kv_heads, s.page, s.head_dim, device=DEVICE, dtype=DTYPE)
    slots = torch.randperm(blocks * s.page, device=DEVICE)[:t]
    rope = (q, k, v, positions, cos_sin, k_cache, torch.empty_like(k_cache), slots)
    size = x.element_size()
    rope_bytes = t * s.head_dim * ((2 * s.heads + 4 * s.kv_heads) * size + 4)
    silu = (randn(t, 2 * s.intermediate), randn(t, s.intermediate))
    return {
        "rms_norm+residual": (
            4 * t * s.hidden * size,
            rms_norm_triton,
            rms_norm_ref,
            (x, weight, 1e-5, residual, torch.empty_like(x)),
        ),
        "rope_kv_write": (rope_bytes, rope_kv_write_triton, rope_kv_write_ref, rope),
        "silu_and_mul": (
            3 * t * s.intermediate * size,
            silu_and_mul_triton,
            silu_and_mul_ref,
            silu,
        ),
    }


def memory_bound() -> list[dict[str, Any]]:
    rows = []
    for t in SIZES.tokens:
        for name, (nbytes, kernel, reference, args) in memory_bound_cases(t).items():
            row = bandwidth_row(partial(kernel, *args), nbytes, kernel=name, tokens=t)
            rows.append({**row, "torch_eager_ms": round(bench_ms(partial(reference, *args)), 4)})
    return rows


def carveout_row(carveout: int, fn: Callable[[], Any], flops: float, **fields: Any) -> dict:
    """Time ``fn`` (a cuBLASLt GEMM) with ``carveout`` SMs left out of its launches."""
    if not GPU:
        return flops_row(fn, flops, **fields)
    previous = torch._C._get_sm_carveout_experimental()
    torch._C._set_sm_carveout_experimental(carveout)
    try:
        return flops_row(fn, flops, **fields)
    finally:
        torch._C._set_sm_carveout_experimental(previous)


def linear() -> dict[str, Any]:
    rows, sms = [], sm_count(DEVICE)
    for m in SIZES.linear_m:
        for k, n in SIZES.linear_kn:
            x, w = randn(m, k), randn(n, k) / k**0.5
            addmm = partial(torch.addmm, torch.zeros(n, device=DEVICE, dtype=DTYPE), x, w.t())
            flops, shape = 2 * m * n * k, f"{m}x{k}->{n}"
            rows.append(flops_row(addmm, flops, shape=shape, impl="cublas_full", num_ctas=sms))
            for budget in budgets()[:-1]:
                fn = partial(linear_triton, x, w, None, budget)
                rows.append(flops_row(fn, flops, shape=shape, impl="triton", num_ctas=budget))
                fields = {"shape": shape, "impl": "cublas_carveout", "num_ctas": budget}
                rows.append(carveout_row(sms - budget, addmm, flops, **fields))
    m, (k, n) = SIZES.linear_m[-1], max(SIZES.linear_kn, key=lambda kn: kn[1])
    x, w, out = randn(m, k), randn(n, k) / k**0.5, randn(m, n)
    sweep = []
    for config, _ in _GPU_CONFIGS if GPU else []:
        fn = partial(_launch_linear, x, w, None, sms, out, config)
        sweep.append(flops_row(fn, 2 * m * n * k, **asdict(config), shape=f"{m}x{k}->{n}"))
    return {"rows": rows, "config_sweep": sweep}


# ---- driver ---------------------------------------------------------------------------------


def run_section(name: str, fn: Callable[[], Any]) -> None:
    """Run one section; a failure is recorded and printed, and the next section still runs."""
    print(f"[{name}]", flush=True)
    start = time.perf_counter()
    try:
        result = fn()
        if result is not None:
            RESULTS[name] = result
        if GPU:
            torch.cuda.synchronize()
    except Exception:
        RESULTS["errors"][name] = traceback.format_exc()
        print(f"*** section {name} FAILED ***\n{RESULTS['errors'][name]}", flush=True)
    finally:
        RESULTS["section_seconds"][name] = round(time.perf_counter() - start, 1)
        if GPU:
            torch.cuda.empty_cache()


def print_table() -> None:
    c = RESULTS.get("ceilings", {})
    print(f"\nceilings: copy {c.get('copy_gbs')} GB/s, GEMM {c.get('gemm_bf16_tflops')} TFLOP/s")
    print("decode attention, GB/s of K/V read (fraction of copy bandwidth):")
    for r in RESULTS.get(DECODE_ATTENTION, {}).get("rows", []):
        where = f"ctx {r['context']:>5} num_ctas {r['num_ctas']!s:>4}"
        print(f"  {where}: {r['gbs']:8.0f} ({r['frac_copy_bw']})")
    for section in ("decode_attention_fp8", "decode_attention_tma"):
        rows = RESULTS.get(section, {}).get("rows", [])
        if rows:
            print(f"{section} (block_n / warps / stages / heads, tma):")
        for r in rows:
            config = f"{r['block_n']}/{r['num_warps']}/{r['num_stages']}/{r['parallel_heads']}"
            config += " tma" if r.get("tma") else ""
            where = f"ctx {r['context']:>5} num_ctas {r['num_ctas']!s:>4} {config:<14}"
            print(f"  {where}: {r['gbs']:8.0f} ({r['frac_copy_bw']})")
    green = RESULTS.get("decode_green_context", {})
    if green:
        copy = green["copy"]
        print(
            f"green context of {green['sms']} SMs: copy {copy['gbs']:.0f} GB/s "
            f"({copy['frac_copy_bw']}); decode attention (block_n / warps / stages / heads):"
        )
    for r in green.get("rows", []):
        config = f"{r['block_n']}/{r['num_warps']}/{r['num_stages']}/{r['parallel_heads']}"
        print(f"  ctx {r['context']:>5} {config:<14}: {r['gbs']:8.0f} ({r['frac_copy_bw']})")
    print("prefill attention, TFLOP/s:")
    for r in RESULTS.get("prefill_attention", {}).get("rows", []):
        where = f"{r['shape']:<18} {r['impl']:<10} num_ctas {r['num_ctas']!s:>4}"
        print(f"  {where}: {r['tflops']:7.1f}")
    print("memory-bound kernels, GB/s (fraction of copy bandwidth), ms vs torch eager ms:")
    for r in RESULTS.get("memory_bound", []):
        where = f"{r['kernel']:<18} T={r['tokens']:>5}"
        print(
            f"  {where}: {r['gbs']:8.0f} ({r['frac_copy_bw']}) {r['ms']} vs {r['torch_eager_ms']}"
        )
    print("linear, TFLOP/s at each SM budget (triton / cuBLAS carveout) and cuBLAS on all SMs:")
    by_shape: dict[str, dict[str, float]] = {}
    for r in RESULTS.get("linear", {}).get("rows", []):
        by_shape.setdefault(r["shape"], {})[f"{r['impl']}@{r['num_ctas']}"] = r["tflops"]
    for shape, figures in by_shape.items():
        print(f"  {shape:<16} " + " ".join(f"{key}={value:.0f}" for key, value in figures.items()))
    failed = [c["name"] for c in RESULTS["checks"] if not c["ok"]]
    print(f"checks: {len(RESULTS['checks']) - len(failed)} ok, {len(failed)} FAILED {failed}")
    print(f"section errors: {list(RESULTS['errors']) or 'none'}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_out_argument(parser)
    parser.add_argument("--label", default="llama-3-8b-shapes", help="the result file's name")
    parser.add_argument(
        "--sections", default=None, help="comma list of timed sections to run (default: all)"
    )
    args = parser.parse_args()
    torch.manual_seed(0)
    RESULTS.update(
        experiment="kernels",
        versions={"torch": torch.__version__, "triton": triton.__version__},
        device=torch.cuda.get_device_name(DEVICE) if GPU else "cpu",
        sm_count=sm_count(DEVICE),
        torch=torch.__version__,
        triton=triton.__version__,
        cuda=torch.version.cuda,
        gpu=torch.cuda.get_device_name(DEVICE) if GPU else None,
        dtype=str(DTYPE),
        sizes=asdict(SIZES),
        decode_config_override=forced_config(),
    )
    start = time.perf_counter()
    run_section("ceilings", ceilings)
    sections = {
        "check_attention": check_attention,
        "check_pointwise": check_pointwise,
        "check_linear": check_linear,
        DECODE_ATTENTION: decode_attention,
        "decode_attention_fp8": decode_attention_fp8,
        "decode_attention_tma": decode_attention_tma,
        **({"decode_green_context": decode_green_context} if GPU else {}),
        "prefill_attention": prefill_attention,
        "memory_bound": memory_bound,
        "linear": linear,
    }
    chosen = args.sections.split(",") if args.sections else list(sections)
    unknown = set(chosen) - set(sections)
    if unknown:
        parser.error(f"unknown sections {sorted(unknown)}; choose from {list(sections)}")
    for name in chosen:
        run_section(name, sections[name])
    RESULTS["total_seconds"] = round(time.perf_counter() - start, 1)
    print_table()
    path = write_result(args.out, "kernels", args.label, RESULTS)
    print(f"wrote {path} in {RESULTS['total_seconds']} s")
    failed = any(not c["ok"] for c in RESULTS["checks"]) or RESULTS["errors"]
    if failed:
        print("*** KERNEL BENCHMARK FAILED: see checks / errors above ***")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
