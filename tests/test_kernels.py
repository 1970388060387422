"""Triton kernels against their PyTorch references, run by Triton's interpreter on CPU tensors.

Only fp32 and fp16 (bf16 is wrong in the interpreter). Outputs are poisoned with NaN first, so a
pass also proves every element was written.
"""

from __future__ import annotations

import importlib
import zlib
from collections.abc import Iterator

import pytest
import torch

pytest.importorskip("triton")

from nanoflow import kernels
from nanoflow.kernels.activation import silu_and_mul_ref, silu_and_mul_triton
from nanoflow.kernels.decode_attention import (
    DecodeConfig,
    _launch_decode,
    _work_split,
    paged_decode_attention_ref,
    paged_decode_attention_triton,
)
from nanoflow.kernels.gemm import _GPU_CONFIGS, _launch_linear, linear_ref, linear_triton
from nanoflow.kernels.norm import rms_norm_ref, rms_norm_triton
from nanoflow.kernels.prefill_attention import (
    PrefillConfig,
    _launch_prefill,
    paged_prefill_attention_ref,
    paged_prefill_attention_triton,
)
from nanoflow.kernels.rotary import rope_kv_write_ref, rope_kv_write_triton

DTYPES = [torch.float32, torch.float16]
DTYPE_IDS = ["fp32", "fp16"]
PAGE = 16


@pytest.fixture(autouse=True)
def _seed(request: pytest.FixtureRequest) -> None:
    """A different, reproducible seed for every test and parameter set."""
    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()))


def tolerance(dtype: torch.dtype) -> dict[str, float]:
    return {"atol": 1e-4, "rtol": 1e-4} if dtype == torch.float32 else {"atol": 4e-3, "rtol": 1e-2}


def poisoned(like: torch.Tensor) -> torch.Tensor:
    return torch.full_like(like, float("nan"))


def paged_cache(
    lens: list[int], num_kv_heads: int, head_dim: int, dtype: torch.dtype, page: int = PAGE
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random K/V caches and a block table whose blocks are shuffled across the pool."""
    width = max(1, *(-(-n // page) for n in lens))
    num_blocks = len(lens) * width + 3
    k_cache = torch.randn(num_blocks, num_kv_heads, page, head_dim, dtype=dtype)
    v_cache = torch.randn_like(k_cache)
    perm = torch.randperm(num_blocks)
    tables = perm[: len(lens) * width].view(len(lens), width).to(torch.int32)
    return k_cache, v_cache, tables


# ---- decode attention -------------------------------------------------------------------------

DECODE_CASES = {
    "ctx1": ([1], 4, 4, 64),
    "ragged_gqa4_d128": ([1, 17, 35, 300], 8, 2, 128),
    "gqa8_d64": ([50, 260], 8, 1, 64),
    "long_and_short": ([400, 3, 129, 16], 4, 2, 64),
    "mha": ([33, 7], 2, 2, 128),
}


def decode_inputs(case: str, dtype: torch.dtype, page: int = PAGE) -> tuple:
    lens, num_heads, num_kv_heads, head_dim = DECODE_CASES[case]
    k_cache, v_cache, tables = paged_cache(lens, num_kv_heads, head_dim, dtype, page)
    q = torch.randn(len(lens), num_heads, head_dim, dtype=dtype)
    return q, k_cache, v_cache, tables, torch.tensor(lens, dtype=torch.int32), head_dim**-0.5


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("case", list(DECODE_CASES))
def test_decode_matches_reference(case: str, dtype: torch.dtype) -> None:
    q, k_cache, v_cache, tables, lens, scale = decode_inputs(case, dtype)
    out = paged_decode_attention_triton(q, k_cache, v_cache, tables, lens, scale, None, poisoned(q))
    expected = paged_decode_attention_ref(q, k_cache, v_cache, tables, lens, scale)
    torch.testing.assert_close(out, expected, **tolerance(dtype))


@pytest.mark.parametrize("num_ctas", [1, 3, 7])
def test_decode_cta_budget_gives_same_result(num_ctas: int) -> None:
    q, k_cache, v_cache, tables, lens, scale = decode_inputs("long_and_short", torch.float32)
    full = paged_decode_attention_triton(q, k_cache, v_cache, tables, lens, scale)
    budget = paged_decode_attention_triton(q, k_cache, v_cache, tables, lens, scale, num_ctas)
    torch.testing.assert_close(budget, full, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("parallel_heads", [1, 2, 8])
@pytest.mark.parametrize("num_ctas", [1, None])
def test_decode_gpu_tiles(num_ctas: int | None, parallel_heads: int) -> None:
    """GPU-sized launch configurations (tiles of 2 pages, splits of 4 tiles; one KV head per
    tile or several side by side) in the interpreter."""
    q, k_cache, v_cache, tables, lens, scale = decode_inputs("long_and_short", torch.float16)
    config = DecodeConfig(32, 4, 4, min_split_tiles=4, parallel_heads=parallel_heads)
    out = _launch_decode(q, k_cache, v_cache, tables, lens, scale, num_ctas, poisoned(q), config)
    expected = paged_decode_attention_ref(q, k_cache, v_cache, tables, lens, scale)
    torch.testing.assert_close(out, expected, **tolerance(torch.float16))


@pytest.mark.parametrize("case", ["ragged_gqa4_d128", "gqa8_d64", "long_and_short", "ctx1"])
@pytest.mark.parametrize(("parallel_heads", "num_ctas"), [(8, None), (1, 3), (2, 1)])
def test_decode_tma_tiles(case: str, parallel_heads: int, num_ctas: int | None) -> None:
    """The TMA-fed launch (one page of the tile's heads per copy, several stages) in the
    interpreter: context splits, an empty split (length 1), every head count per tile."""
    q, k_cache, v_cache, tables, lens, scale = decode_inputs(case, torch.float16)
    config = DecodeConfig(PAGE, 4, 3, min_split_tiles=2, parallel_heads=parallel_heads, tma=True)
    out = _launch_decode(q, k_cache, v_cache, tables, lens, scale, num_ctas, poisoned(q), config)
    expected = paged_decode_attention_ref(q, k_cache, v_cache, tables, lens, scale)
    torch.testing.assert_close(out, expected, **tolerance(torch.float16))


def test_decode_tma_reads_an_fp8_cache() -> None:
    q, k_cache, v_cache, tables, lens, scale = decode_inputs("ragged_gqa4_d128", torch.float16)
    k8, v8 = k_cache.to(FP8), v_cache.to(FP8)
    config = DecodeConfig(PAGE, 4, 3, min_split_tiles=2, parallel_heads=2, tma=True)
    out = _launch_decode(q, k8, v8, tables, lens, scale, 3, poisoned(q), config)
    expected = paged_decode_attention_ref(q, k8, v8, tables, lens, scale)
    torch.testing.assert_close(out, expected, **tolerance(torch.float16))


def test_decode_tma_says_what_it_cannot_read() -> None:
    q, k_cache, v_cache, tables, lens, scale = decode_inputs("mha", torch.float16)
    config = DecodeConfig(PAGE, 4, 3, min_split_tiles=2, tma=True)
    args = (q, k_cache, v_cache, tables, lens, scale, None, torch.empty_like(q))
    with pytest.raises(ValueError, match="block_n must be"):
        _launch_decode(*args, DecodeConfig(2 * PAGE, 4, 3, min_split_tiles=2, tma=True))
    with pytest.raises(ValueError, match="contiguous"):
        strided = k_cache.transpose(1, 2).contiguous().transpose(1, 2)
        _launch_decode(q, strided, v_cache, *args[3:], config)


def test_decode_config_feeds_hopper_by_tma(monkeypatch) -> None:
    """On sm_90 and later the engine's decode launches are TMA-fed, with boxes of 128 rows
    (fewer heads for larger pages), a budgeted fp8 grid taking the wider tile; older GPUs and
    caches that are not whole contiguous pages keep the register-fed kernel."""
    from nanoflow.kernels.decode_attention import decode_config

    gpu = torch.device("cuda", 0)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    assert decode_config(128, torch.bfloat16, gpu) == DecodeConfig(16, 8, 5, 4, 8, tma=True)
    assert decode_config(128, torch.bfloat16, gpu, page=64).parallel_heads == 2
    fp8_full = decode_config(128, torch.bfloat16, gpu, narrow_cache=True)
    assert fp8_full == DecodeConfig(16, 4, 12, 4, 4, tma=True)
    fp8_budgeted = decode_config(128, torch.bfloat16, gpu, narrow_cache=True, budgeted=True)
    assert fp8_budgeted == DecodeConfig(16, 8, 8, 4, 8, tma=True)
    assert not decode_config(128, torch.bfloat16, gpu, tma=False).tma
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    assert not decode_config(128, torch.bfloat16, gpu).tma


def test_decode_config_can_be_forced_for_an_experiment(monkeypatch) -> None:
    """NANOFLOW_DECODE_CONFIG (read at start-up, or set by force_config) replaces the built-in
    choice in every launch (and says plainly what is wrong with a malformed value); the result
    files record it."""
    from nanoflow.kernels import decode_attention
    from nanoflow.kernels.decode_attention import decode_config, force_config
    from nanoflow.measure import environment

    monkeypatch.setattr(decode_attention, "_forced", "")  # restored after the test

    cpu = torch.device("cpu")
    force_config("16, 4, 2, 1, 2, tma")
    forced = decode_config(64, torch.float16, cpu)
    assert forced == DecodeConfig(16, 4, 2, 1, 2, tma=True)
    assert environment(cpu)["decode_config_override"] == "16, 4, 2, 1, 2, tma"
    q, k_cache, v_cache, tables, lens, scale = decode_inputs("long_and_short", torch.float16)
    out = paged_decode_attention_triton(q, k_cache, v_cache, tables, lens, scale, 3, poisoned(q))
    expected = paged_decode_attention_ref(q, k_cache, v_cache, tables, lens, scale)
    torch.testing.assert_close(out, expected, **tolerance(torch.float16))
    for bad, message in (("16,4,2", "expected block_n"), ("16,4,x,1,2", "integers"),
                         ("16,4,0,1,2", "positive"), ("16,4,2,1,2,fast", "expected")):  # fmt: skip
        force_config(bad)
        with pytest.raises(ValueError, match=message):
            decode_config(64, torch.float16, cpu)
    force_config(None)
    assert not decode_config(64, torch.float16, cpu).tma
    assert "decode_config_override" not in environment(cpu)


@pytest.mark.parametrize("page", [8, 32])
def test_decode_other_block_sizes(page: int) -> None:
    q, k_cache, v_cache, tables, lens, scale = decode_inputs("long_and_short", torch.float32, page)
    out = paged_decode_attention_triton(q, k_cache, v_cache, tables, lens, scale, 3, poisoned(q))
    expected = paged_decode_attention_ref(q, k_cache, v_cache, tables, lens, scale)
    torch.testing.assert_close(out, expected, **tolerance(torch.float32))


@pytest.mark.parametrize(("batch", "num_ctas"), [(256, 33), (256, 132), (8, 33), (1, 132)])
def test_decode_work_split(batch: int, num_ctas: int) -> None:
    """Enough work items per program to balance the budget: a tile keeps all 8 KV heads, so only
    the context is split, and no shorter than allowed."""
    config = DecodeConfig(64, 4, 4, min_split_tiles=4, parallel_heads=8)
    heads_per_item, splits, split_len = _work_split(batch, 8, 4096, num_ctas, config)
    assert heads_per_item == 8
    items = batch * splits
    assert items >= 2 * num_ctas or split_len == 4 * 64  # or the splits are as short as allowed
    assert split_len % 64 == 0 and splits * split_len >= 4096 > (splits - 1) * split_len


def test_decode_parallel_heads_divide_the_kv_heads() -> None:
    """A tile never holds more heads than the model has, nor a count that does not divide them."""
    config = DecodeConfig(32, 8, 3, min_split_tiles=4, parallel_heads=8)
    assert [_work_split(4, kv, 256, 33, config)[0] for kv in (1, 2, 4, 8, 32, 12)] == [
        1, 2, 4, 8, 8, 4,
    ]  # fmt: skip


def test_decode_empty_batch_and_bad_input() -> None:
    q, k_cache, v_cache, tables, lens, scale = decode_inputs("mha", torch.float32)
    empty = paged_decode_attention_triton(q[:0], k_cache, v_cache, tables[:0], lens[:0], scale)
    assert empty.shape == (0, *q.shape[1:])
    with pytest.raises(ValueError, match="num_heads be a multiple"):
        paged_decode_attention_triton(q[:, :1].expand(-1, 3, -1), k_cache, v_cache, tables, lens, 1)
    with pytest.raises(ValueError, match="dtypes differ"):
        paged_decode_attention_triton(q.half(), k_cache, v_cache, tables, lens, scale)
    with pytest.raises(ValueError, match="num_ctas"):
        paged_decode_attention_triton(q, k_cache, v_cache, tables, lens, scale, 0)


# ---- prefill attention ------------------------------------------------------------------------

# (query lengths, context lengths, num_heads, num_kv_heads, head_dim)
PREFILL_CASES = {
    "fresh_prompt": ([37], [37], 4, 4, 64),
    "long_prefix": ([20], [300], 8, 2, 128),
    "mixed_chunks_gqa8": ([5, 1, 0, 40], [5, 90, 7, 40], 8, 1, 64),
    "gqa4_two_prompts": ([17, 33], [17, 33], 8, 2, 64),
}


def prefill_inputs(case: str, dtype: torch.dtype, page: int = PAGE) -> tuple:
    q_lens, ctx_lens, num_heads, num_kv_heads, head_dim = PREFILL_CASES[case]
    k_cache, v_cache, tables = paged_cache(ctx_lens, num_kv_heads, head_dim, dtype, page)
    cu = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32)
    q = torch.randn(sum(q_lens), num_heads, head_dim, dtype=dtype)
    lens = torch.tensor(ctx_lens, dtype=torch.int32)
    return q, k_cache, v_cache, tables, cu, lens, max(q_lens), head_dim**-0.5


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("case", list(PREFILL_CASES))
def test_prefill_matches_reference(case: str, dtype: torch.dtype) -> None:
    args = prefill_inputs(case, dtype)
    out = paged_prefill_attention_triton(*args, None, poisoned(args[0]))
    torch.testing.assert_close(out, paged_prefill_attention_ref(*args), **tolerance(dtype))


@pytest.mark.parametrize("num_ctas", [1, 3])
def test_prefill_cta_budget_gives_same_result(num_ctas: int) -> None:
    args = prefill_inputs("mixed_chunks_gqa8", torch.float32)
    full = paged_prefill_attention_triton(*args)
    budget = paged_prefill_attention_triton(*args, num_ctas, poisoned(args[0]))
    torch.testing.assert_close(budget, full, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("case", ["long_prefix", "mixed_chunks_gqa8"])
def test_prefill_gpu_tiles(case: str) -> None:
    """The GPU launch configuration (128-row tiles) in the interpreter."""
    args = prefill_inputs(case, torch.float16)
    config = PrefillConfig(block_m=128, block_n=64, num_warps=8, num_stages=3)
    out = _launch_prefill(*args, 2, poisoned(args[0]), config)
    torch.testing.assert_close(out, paged_prefill_attention_ref(*args), **tolerance(torch.float16))


@pytest.mark.parametrize("page", [8, 32])
def test_prefill_other_block_sizes(page: int) -> None:
    args = prefill_inputs("mixed_chunks_gqa8", torch.float32, page)
    out = paged_prefill_attention_triton(*args, 3, poisoned(args[0]))
    torch.testing.assert_close(out, paged_prefill_attention_ref(*args), **tolerance(torch.float32))


def test_prefill_bad_input() -> None:
    q, k_cache, v_cache, tables, cu, lens, max_q_len, scale = prefill_inputs(
        "fresh_prompt", DTYPES[0]
    )
    with pytest.raises(ValueError, match="cu_q_lens"):
        paged_prefill_attention_triton(q, k_cache, v_cache, tables, cu[:1], lens, max_q_len, scale)


# ---- RMSNorm, RoPE + KV write, SiLU-and-mul ---------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("hidden", [64, 1000])
@pytest.mark.parametrize("with_residual", [False, True])
def test_rms_norm(dtype: torch.dtype, hidden: int, with_residual: bool) -> None:
    buffer = torch.randn(9, hidden + 8, dtype=dtype)
    x = buffer[2:, :hidden]  # a strided view, like a nano-batch slice of a step buffer
    weight = torch.randn(hidden, dtype=dtype)
    residual = torch.randn(7, hidden, dtype=dtype) if with_residual else None
    ref_residual = residual.clone() if with_residual else None
    out = rms_norm_triton(x, weight, 1e-6, residual, poisoned(x))
    expected = rms_norm_ref(x, weight, 1e-6, ref_residual)
    torch.testing.assert_close(out, expected, **tolerance(dtype))
    if with_residual:
        torch.testing.assert_close(residual, ref_residual, atol=0, rtol=0)


@pytest.mark.parametrize("rows", [255, 300, 1030])
def test_rms_norm_over_decode_and_prefill_sized_batches(rows: int) -> None:
    x = torch.randn(rows, 48)
    weight, residual = torch.randn(48), torch.randn(rows, 48)
    ref_residual = residual.clone()
    out = rms_norm_triton(x, weight, 1e-6, residual, poisoned(x))
    torch.testing.assert_close(out, rms_norm_ref(x, weight, 1e-6, ref_residual))
    torch.testing.assert_close(residual, ref_residual, atol=0, rtol=0)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize(("num_heads", "num_kv_heads", "head_dim"), [(8, 2, 64), (4, 4, 128)])
def test_rope_kv_write(
    dtype: torch.dtype, num_heads: int, num_kv_heads: int, head_dim: int
) -> None:
    tokens, num_blocks = 11, 4
    qkv = torch.randn(tokens, (num_heads + 2 * num_kv_heads) * head_dim, dtype=dtype)
    q, k, v = qkv.split([num_heads * head_dim, num_kv_heads * head_dim, num_kv_heads * head_dim], 1)
    q, k, v = (t.unflatten(1, (-1, head_dim)) for t in (q, k, v))
    positions = torch.randint(0, 100, (tokens,))
    cos_sin = torch.randn(128, head_dim)
    slots = torch.randperm(num_blocks * PAGE)[:tokens]
    caches = [torch.full((num_blocks, num_kv_heads, PAGE, head_dim), float("nan"), dtype=dtype)]
    caches += [caches[0].clone() for _ in range(3)]
    q_ref = q.clone()
    rope_kv_write_triton(q, k, v, positions, cos_sin, caches[0], caches[1], slots)
    rope_kv_write_ref(q_ref, k, v, positions, cos_sin, caches[2], caches[3], slots)
    torch.testing.assert_close(q, q_ref, **tolerance(dtype))
    torch.testing.assert_close(caches[0], caches[2], equal_nan=True, **tolerance(dtype))
    torch.testing.assert_close(caches[1], caches[3], equal_nan=True, atol=0, rtol=0)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("shape", [(1, 128), (7, 600), (3, 5000)])
def test_silu_and_mul(dtype: torch.dtype, shape: tuple[int, int]) -> None:
    x = torch.randn(*shape, dtype=dtype)
    out = silu_and_mul_triton(x, poisoned(x[:, : shape[1] // 2]))
    torch.testing.assert_close(out, silu_and_mul_ref(x), **tolerance(dtype))


# ---- linear -----------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize(("m", "n", "k"), [(1, 48, 64), (37, 70, 40), (64, 96, 128)])
@pytest.mark.parametrize("with_bias", [False, True])
def test_linear(dtype: torch.dtype, m: int, n: int, k: int, with_bias: bool) -> None:
    x = torch.randn(m, k, dtype=dtype)
    weight = torch.randn(n, k, dtype=dtype) / k**0.5
    bias = torch.randn(n, dtype=dtype) if with_bias else None
    out = linear_triton(x, weight, bias, None, poisoned(x.new_empty(m, n)))
    expected = linear_ref(x.float(), weight.float(), None if bias is None else bias.float())
    torch.testing.assert_close(out.float(), expected, **tolerance(dtype))


@pytest.mark.parametrize("num_ctas", [1, 3])
def test_linear_cta_budget_gives_same_result(num_ctas: int) -> None:
    x, weight = torch.randn(70, 48), torch.randn(100, 48)
    full = linear_triton(x, weight)
    torch.testing.assert_close(linear_triton(x, weight, None, num_ctas), full, atol=0, rtol=0)


@pytest.mark.parametrize("index", range(len(_GPU_CONFIGS)))
def test_linear_gpu_tiles(index: int) -> None:
    """Each GPU tile configuration in the interpreter, with ragged M and N."""
    config = _GPU_CONFIGS[index][0]
    x, weight = (
        torch.randn(70, 128, dtype=torch.float16),
        torch.randn(300, 128, dtype=torch.float16),
    )
    bias = torch.randn(300, dtype=torch.float16)
    out = _launch_linear(x, weight / 11, bias, 2, poisoned(x.new_empty(70, 300)), config)
    expected = linear_ref(x.float(), weight.float() / 11, bias.float())
    torch.testing.assert_close(out.float(), expected, **tolerance(torch.float16))


def test_linear_bad_input() -> None:
    with pytest.raises(ValueError, match="do not match"):
        linear_triton(torch.randn(3, 8), torch.randn(4, 9))


# ---- dispatch ---------------------------------------------------------------------------------


@pytest.fixture
def forced_triton() -> Iterator[None]:
    kernels.set_backend("triton")
    yield
    kernels.set_backend("auto")


def test_forced_triton_dispatch(forced_triton: None) -> None:
    x = torch.randn(4, 2 * 32)
    torch.testing.assert_close(kernels.silu_and_mul(x), silu_and_mul_ref(x))
    assert kernels.backend_for(x) == "triton"


def test_dispatch_keeps_the_reference_signature_and_no_submodule_is_shadowed() -> None:
    import inspect
    import types

    from nanoflow.kernels.activation import silu_and_mul_ref as ref

    assert inspect.signature(kernels.silu_and_mul) == inspect.signature(ref)
    modules = (
        "norm",
        "moe",
        "gemm",
        "rotary",
        "activation",
        "decode_attention",
        "prefill_attention",
    )
    for name in modules:
        assert isinstance(importlib.import_module(f"nanoflow.kernels.{name}"), types.ModuleType)
        assert isinstance(getattr(kernels, name), types.ModuleType)
    with pytest.raises(ValueError, match="backend"):
        kernels.set_backend("cuda")


# ---- fp8 KV cache -----------------------------------------------------------------------------

FP8 = torch.float8_e4m3fn


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("case", ["ragged_gqa4_d128", "long_and_short"])
def test_decode_reads_an_fp8_cache(case: str, dtype: torch.dtype) -> None:
    """Queries in the model's type against K/V stored as float8 e4m3: the kernel widens the
    cache after loading it, as the reference does, so only the usual rounding differs."""
    q, k_cache, v_cache, tables, lens, scale = decode_inputs(case, dtype)
    k8, v8 = k_cache.to(FP8), v_cache.to(FP8)
    out = paged_decode_attention_triton(q, k8, v8, tables, lens, scale, 3, poisoned(q))
    expected = paged_decode_attention_ref(q, k8, v8, tables, lens, scale)
    torch.testing.assert_close(out, expected, **tolerance(dtype))


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_prefill_reads_an_fp8_cache(dtype: torch.dtype) -> None:
    q, k_cache, v_cache, tables, cu, lens, max_q, scale = prefill_inputs("long_prefix", dtype)
    k8, v8 = k_cache.to(FP8), v_cache.to(FP8)
    args = (q, k8, v8, tables, cu, lens, max_q, scale)
    out = paged_prefill_attention_triton(*args, None, poisoned(q))
    torch.testing.assert_close(out, paged_prefill_attention_ref(*args), **tolerance(dtype))


def test_rope_kv_write_stores_into_an_fp8_cache() -> None:
    """The fused RoPE + KV write fills an fp8 cache where the reference does. The values are
    fp8-representable and the rotation the identity, so no rounding is involved: the Triton
    interpreter's float-to-fp8 conversion drops the carry when a value rounds up into the next
    power of two (-1.99 becomes -1.0), which the GPU's conversion does not."""
    tokens, heads, kv_heads, dim, blocks = 5, 4, 2, 64, 3
    q = torch.randn(tokens, heads, dim)
    k = torch.randn(tokens, kv_heads, dim).to(FP8).float()
    v = torch.randn(tokens, kv_heads, dim).to(FP8).float()
    positions = torch.tensor([0, 1, 2, 7, 9], dtype=torch.int32)
    slots = torch.tensor([0, 1, 2, 17, 33], dtype=torch.int32)
    cos_sin = torch.cat([torch.ones(16, dim // 2), torch.zeros(16, dim // 2)], dim=1)
    caches = [torch.zeros(blocks, kv_heads, PAGE, dim, dtype=FP8) for _ in range(4)]
    rope_kv_write_ref(q.clone(), k, v, positions, cos_sin, caches[0], caches[1], slots)
    rope_kv_write_triton(q.clone(), k, v, positions, cos_sin, caches[2], caches[3], slots)
    assert torch.equal(caches[2].float(), caches[0].float())
    assert torch.equal(caches[3].float(), caches[1].float())
    assert torch.equal(caches[1].float()[2, :, 1], v[4])  # slot 33 = block 2, offset 1


# ---- specialisation ---------------------------------------------------------------------------


def _launch_args(kernel, run) -> list[dict]:
    """Each launch of ``kernel`` during ``run()``: its runtime (non-constexpr) integer
    arguments by name, and for each tensor whether its address is 16-byte aligned."""
    launches = []

    def record(*args, **constexprs) -> None:
        named = dict(zip(kernel.arg_names, args, strict=False))  # constexprs come by keyword
        launches.append(
            {k: v for k, v in named.items() if type(v) is int}
            | {k: v.data_ptr() % 16 == 0 for k, v in named.items() if isinstance(v, torch.Tensor)}
        )

    kernel.add_pre_run_hook(record)
    try:
        run()
    finally:
        kernel.pre_run_hooks.remove(record)
    return launches


def _varying(kernel, *runs) -> set[str]:
    """Arguments of ``kernel`` whose value (an integer) or alignment (a tensor) differs between
    the launches of ``runs``."""
    launches = [args for run in runs for args in _launch_args(kernel, run)]
    assert len(launches) >= 2, f"{kernel.__name__} was not launched by every step"
    return {name for name in launches[0] if len({args[name] for args in launches}) > 1}


def _unspecialised(kernel, what: str = "do_not_specialize") -> set[str]:
    """The arguments ``kernel`` was declared with ``do_not_specialize`` (or ``what``):
    interpreted kernels keep the decorator's keywords."""
    return set(kernel.kwargs.get(what) or ())


def _decode_step(lens: list[int], config: DecodeConfig):
    k_cache, v_cache, tables = paged_cache(lens, 2, 64, torch.float16)
    q = torch.randn(len(lens), 8, 64, dtype=torch.float16)
    lens_t = torch.tensor(lens, dtype=torch.int32)
    return lambda: _launch_decode(
        q, k_cache, v_cache, tables, lens_t, 0.125, None, poisoned(q), config
    )


@pytest.mark.parametrize("tma", [False, True], ids=["register-fed", "tma-fed"])
def test_decode_step_sizes_are_not_specialised(tma: bool) -> None:
    """Two decode steps of different batch, context and block-table width launch the kernels
    with different sizes; Triton compiles a binary per value class (1, multiple of 16, other) of
    an integer it specialises, so each size that differs must be one it does not."""
    from nanoflow.kernels import decode_attention, decode_attention_tma

    config = DecodeConfig(PAGE, 4, 2, min_split_tiles=1, parallel_heads=2, tma=tma)
    steps = [_decode_step([5, 40, 17], config), _decode_step([1, 300, 33, 64, 90, 2, 7], config)]
    main = decode_attention_tma._decode_tma_kernel if tma else decode_attention._decode_heads_kernel
    for kernel in (main, decode_attention._decode_reduce_kernel):
        varying = _varying(kernel, *steps)
        assert {"num_seqs", "num_splits"} <= varying  # the two steps differ where a step can
        assert varying <= _unspecialised(kernel), kernel.__name__


def test_prefill_and_gemm_step_sizes_are_not_specialised() -> None:
    """The same for prompt chunks (their count, the longest, the block-table width) and for a
    GEMM's row count."""
    from nanoflow.kernels import gemm, prefill_attention

    def prefill_step(q_lens: list[int], ctx_lens: list[int]):
        k_cache, v_cache, tables = paged_cache(ctx_lens, 2, 64, torch.float32)
        cu = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32)
        q = torch.randn(sum(q_lens), 8, 64)
        lens = torch.tensor(ctx_lens, dtype=torch.int32)
        config = PrefillConfig(16, 16, 4, 2)
        return lambda: _launch_prefill(
            q, k_cache, v_cache, tables, cu, lens, max(q_lens), 0.125, None, poisoned(q), config
        )

    kernel = prefill_attention._prefill_kernel
    varying = _varying(kernel, prefill_step([9], [9]), prefill_step([40, 3, 17], [40, 70, 200]))
    assert {"num_chunks", "tiles_per_chunk", "stride_tb"} <= varying
    assert varying <= _unspecialised(kernel)

    weight = torch.randn(32, 64)
    config = _GPU_CONFIGS[-1][0]

    def gemm_step(rows: int):
        x = torch.randn(rows, 64)
        return lambda: _launch_linear(x, weight, None, 4, poisoned(x[:, :32]), config)

    kernel = gemm._linear_kernel
    varying = _varying(kernel, gemm_step(3), gemm_step(48))
    assert varying == {"M"} and varying <= _unspecialised(kernel)


def test_rope_kv_write_takes_any_row_offset_unspecialised() -> None:
    """A nano-batch passes its rows of the step's positions and cache slots, which start at any
    row: the kernel must not specialise on those pointers' alignment (int64 rows at an odd
    offset are 8-byte aligned only). q, k and v rows stay aligned, and keep their specialisation."""
    from nanoflow.kernels import rotary

    tokens, heads, kv_heads, dim = 9, 4, 2, 64
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * dim)
    q, k, v = (
        t.unflatten(1, (-1, dim)) for t in qkv.split([heads * dim, *[kv_heads * dim] * 2], 1)
    )
    positions = torch.arange(tokens)
    slots = torch.randperm(4 * PAGE)[:tokens]
    cos_sin = torch.randn(32, dim)
    caches = [torch.zeros(4, kv_heads, PAGE, dim) for _ in range(2)]

    def step(rows: slice):
        return lambda: rope_kv_write_triton(
            q[rows], k[rows], v[rows], positions[rows], cos_sin, *caches, slots[rows]
        )

    kernel = rotary._rope_kv_write_kernel
    varying = _varying(kernel, step(slice(0, 4)), step(slice(3, 9)))
    assert varying == {"pos_ptr", "slot_ptr"}
    assert varying <= _unspecialised(kernel, "do_not_specialize_on_alignment")
