"""The quantizing kernels (RMSNorm + residual, SiLU-and-mul, the plain pass) against their
references, and the references against the unquantized kernels.

Triton's interpreter runs the kernels on CPU tensors, but its float32 -> e4m3 cast rounds a
value that rounds up to a power of two into the binade below (126.7 becomes 64, not 128), so on
CPU those elements are allowed to be exactly half the reference's and every other element must
match; on a GPU (the ``gpu`` tests) every element must.
"""

from __future__ import annotations

import pytest
import torch

from nanoflow.kernels.activation import silu_and_mul_ref
from nanoflow.kernels.fp8_linear import FP8_DTYPE, MIN_SCALE, quantize_rows
from nanoflow.kernels.norm import rms_norm_ref
from nanoflow.kernels.quant import (
    quantize_fp8_ref,
    quantize_fp8_triton,
    rms_norm_quant_ref,
    rms_norm_quant_triton,
    silu_and_mul_quant_ref,
    silu_and_mul_quant_triton,
)

SHAPES = [(1, 16), (3, 100), (17, 256), (5, 1000), (2, 4500)]
GPU = torch.cuda.is_available()


def _dequant(q: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    return q[0].float() * q[1].unsqueeze(-1)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def assert_e4m3_match(got, want, interpreter: bool) -> None:
    """Scales equal to fp32 rounding; values equal except one-step differences of fp32 rounding
    order (rare), and on the interpreter its power-of-two rollovers."""
    (g, gs), (w, ws) = got, want
    assert g.dtype == FP8_DTYPE and gs.dtype == torch.float32
    torch.testing.assert_close(gs, ws, rtol=1e-5, atol=0.0)
    g, w = g.float(), w.float()
    differ = g != w
    if interpreter:
        power_of_two = (w != 0) & (torch.exp2(torch.log2(w.abs()).round()) == w.abs())
        differ &= ~(power_of_two & (g == w / 2))
    one_step = (g - w).abs() <= w.abs() / 8 + 2**-9
    assert bool((one_step | ~differ).all()), (g[differ][:8], w[differ][:8])
    assert differ.float().mean().item() <= 0.01


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("with_residual", [False, True])
def test_rms_norm_quant_reference_is_the_norm_quantized(shape, with_residual):
    torch.manual_seed(0)
    x, w = torch.randn(shape), torch.rand(shape[-1]) + 0.5
    res_a = torch.randn(shape) if with_residual else None
    res_b = res_a.clone() if with_residual else None
    want = rms_norm_ref(x, w, 1e-5, res_a)
    got = rms_norm_quant_ref(x, w, 1e-5, res_b)
    if with_residual:
        assert torch.equal(res_a, res_b)
    assert _rel(_dequant(got), want) < 0.04


@pytest.mark.parametrize("shape", SHAPES)
def test_silu_mul_quant_reference_is_silu_mul_quantized(shape):
    torch.manual_seed(1)
    x = torch.randn(shape[0], 2 * shape[1])
    got = silu_and_mul_quant_ref(x)
    assert got[0].shape == shape and got[1].shape == shape[:1]
    assert _rel(_dequant(got), silu_and_mul_ref(x)) < 0.04


def test_quantize_reference_writes_into_given_buffers():
    x = torch.randn(6, 40)
    out = torch.empty(6, 40, dtype=FP8_DTYPE)
    scale = torch.empty(6)
    data, s = quantize_fp8_ref(x, out, scale)
    assert data is out and s is scale
    want = quantize_rows(x)
    assert torch.equal(out.float(), want[0].float()) and torch.equal(scale, want[1])
    with pytest.raises(ValueError, match="out_scale"):
        quantize_fp8_ref(x, out, torch.empty(5))
    with pytest.raises(ValueError, match="out must be"):
        quantize_fp8_ref(x, torch.empty(6, 40), scale)


def test_zero_rows_get_the_smallest_scale():
    data, scale = silu_and_mul_quant_ref(torch.zeros(2, 8))
    assert torch.equal(scale, torch.full((2,), MIN_SCALE)) and not data.float().any()


def _cases(device: str, dtype: torch.dtype):
    gen = torch.Generator().manual_seed(2)
    for rows, cols in SHAPES:
        spread = torch.logspace(-2, 2, rows)[:, None]
        x = (torch.randn(rows, cols, generator=gen) * spread).to(device, dtype)
        yield x, torch.randn(rows, cols, generator=gen).to(device, dtype)


def _check_all(device: str, dtype: torch.dtype, interpreter: bool) -> None:
    for x, r in _cases(device, dtype):
        w = (torch.rand(x.shape[-1]) + 0.5).to(device, dtype)
        for residual in (None, r):
            ra = None if residual is None else residual.clone()
            rb = None if residual is None else residual.clone()
            want = rms_norm_quant_ref(x, w, 1e-6, ra)
            got = rms_norm_quant_triton(x, w, 1e-6, rb)
            if residual is not None:
                assert torch.equal(ra, rb)
            assert_e4m3_match(got, want, interpreter)
        gated = torch.cat([x, r], dim=-1)
        assert_e4m3_match(silu_and_mul_quant_triton(gated), silu_and_mul_quant_ref(gated),
                          interpreter)  # fmt: skip
        assert_e4m3_match(quantize_fp8_triton(x), quantize_fp8_ref(x), interpreter)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_triton_kernels_match_the_references_in_the_interpreter(dtype):
    _check_all("cpu", dtype, interpreter=True)


def test_triton_kernels_write_into_strided_rows_and_given_buffers():
    x = torch.randn(4, 2 * 64)
    out = torch.empty(8, 64, dtype=FP8_DTYPE)[::2]  # rows of stride 128
    scale = torch.empty(4)
    data, s = silu_and_mul_quant_triton(x, out, scale)
    assert data is out and s is scale
    assert_e4m3_match((out, scale), silu_and_mul_quant_ref(x), interpreter=True)
    with pytest.raises(ValueError, match="even"):
        silu_and_mul_quant_triton(torch.randn(2, 7))
    with pytest.raises(ValueError, match="weight"):
        rms_norm_quant_triton(torch.randn(2, 8), torch.ones(4), 1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not GPU, reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_triton_kernels_match_the_references_on_the_gpu(dtype):
    _check_all("cuda", dtype, interpreter=False)
