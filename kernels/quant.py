"""Activation quantization fused into the kernels that produce the activations, so the GEMM
after them reads e4m3 and no op reads the activation in the model's dtype twice: RMSNorm
(+ residual add), SiLU-and-mul, and one pass over an activation already written (the attention
output feeding O). Each returns the e4m3 rows and one fp32 scale per row (the row's largest
magnitude over e4m3's largest value, at least ``MIN_SCALE``)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from nanoflow.kernels._compat import as_rows, jit, next_pow2, num_warps_for, tl
from nanoflow.kernels.fp8_linear import FP8_DTYPE, FP8_MAX, MIN_SCALE, quantize_rows
from nanoflow.kernels.norm import residual_rms_norm_row

Quantized = tuple[torch.Tensor, torch.Tensor]
_CHUNK = 2048  # columns per loop step of the two-pass kernels


def _outputs(x: torch.Tensor, width: int, out: torch.Tensor | None, scale: torch.Tensor | None):
    rows = x.shape[:-1]
    if out is None:
        out = torch.empty(*rows, width, dtype=FP8_DTYPE, device=x.device)
    if scale is None:
        scale = torch.empty(rows, dtype=torch.float32, device=x.device)
    if out.shape != (*rows, width) or out.dtype != FP8_DTYPE or out.device != x.device:
        raise ValueError(f"out must be {FP8_DTYPE} {(*rows, width)} on {x.device}")
    if scale.shape != rows or scale.dtype != torch.float32 or not scale.is_contiguous():
        raise ValueError(f"out_scale must be a contiguous float32 {tuple(rows)}")
    return out, scale


def _store(y: torch.Tensor, out: torch.Tensor | None, scale: torch.Tensor | None) -> Quantized:
    data, s = quantize_rows(y)
    if out is None and scale is None:
        return data, s
    out, scale = _outputs(y, y.shape[-1], out, scale)
    out.copy_(data)
    scale.copy_(s)
    return out, scale


def rms_norm_quant_ref(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    residual: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    out_scale: torch.Tensor | None = None,
) -> Quantized:
    """``rms_norm_ref`` (the residual updated in place the same way) quantized from fp32."""
    if residual is not None:
        residual.add_(x)
        x = residual
    xf = x.float()
    normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * weight.float()
    return _store(normed, out, out_scale)


def silu_and_mul_quant_ref(
    x: torch.Tensor, out: torch.Tensor | None = None, out_scale: torch.Tensor | None = None
) -> Quantized:
    """``silu(gate) * up`` of ``[T, 2*I]`` quantized from fp32 to ``[T, I]``."""
    half = x.shape[-1] // 2
    return _store(F.silu(x[..., :half].float()) * x[..., half:].float(), out, out_scale)


def quantize_fp8_ref(
    x: torch.Tensor, out: torch.Tensor | None = None, out_scale: torch.Tensor | None = None
) -> Quantized:
    return _store(x.float(), out, out_scale)


@jit
def _rms_norm_quant_kernel(
    x_ptr, res_ptr, w_ptr, out_ptr, scale_ptr, eps, n_cols, stride_x, stride_r, stride_o,
    FP8_MAX_: tl.constexpr, MIN_SCALE_: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
    BLOCK: tl.constexpr,
):  # fmt: skip
    """One row per program, the whole row in registers: the norm (as RMSNorm's) and the scale
    computed in fp32."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    _, y = residual_rms_norm_row(
        x_ptr, res_ptr, w_ptr, row, cols, mask, eps, n_cols, stride_x, stride_r, HAS_RESIDUAL
    )
    scale = tl.maximum(tl.max(tl.abs(y), 0) / FP8_MAX_, MIN_SCALE_)
    q = tl.clamp(y / scale, -FP8_MAX_, FP8_MAX_)
    tl.store(out_ptr + row * stride_o + cols, q.to(out_ptr.dtype.element_ty), mask=mask)
    tl.store(scale_ptr + row, scale)


@jit
def _silu_mul_quant_kernel(
    x_ptr, out_ptr, scale_ptr, n_cols, up_offset, stride_x, stride_o,
    FP8_MAX_: tl.constexpr, MIN_SCALE_: tl.constexpr, GATED: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    """One row per program in two passes of ``BLOCK`` columns: the row's largest magnitude,
    then the quantized values (recomputed from the row, which the first pass left in cache).
    ``GATED``: ``silu(x[:, :n]) * x[:, n:]``; else ``x`` itself (the plain quantizing pass)."""
    row = tl.program_id(0).to(tl.int64)
    base = x_ptr + row * stride_x
    amax = tl.zeros([BLOCK], tl.float32)
    for start in range(0, n_cols, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        mask = cols < n_cols
        y = tl.load(base + cols, mask=mask, other=0.0).to(tl.float32)
        if GATED:
            up = tl.load(base + up_offset + cols, mask=mask, other=0.0).to(tl.float32)
            y = y * tl.sigmoid(y) * up
        amax = tl.maximum(amax, tl.abs(y))
    scale = tl.maximum(tl.max(amax, 0) / FP8_MAX_, MIN_SCALE_)
    for start in range(0, n_cols, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        mask = cols < n_cols
        y = tl.load(base + cols, mask=mask, other=0.0).to(tl.float32)
        if GATED:
            up = tl.load(base + up_offset + cols, mask=mask, other=0.0).to(tl.float32)
            y = y * tl.sigmoid(y) * up
        q = tl.clamp(y / scale, -FP8_MAX_, FP8_MAX_)
        tl.store(out_ptr + row * stride_o + cols, q.to(out_ptr.dtype.element_ty), mask=mask)
    tl.store(scale_ptr + row, scale)


def rms_norm_quant_triton(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    residual: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    out_scale: torch.Tensor | None = None,
) -> Quantized:
    """Residual add + RMSNorm + per-row e4m3 quantization in one pass over the hidden states."""
    hidden = x.shape[-1]
    if weight.shape != (hidden,) or weight.device != x.device:
        raise ValueError(f"weight must be [{hidden}] on {x.device}, got {tuple(weight.shape)}")
    if residual is not None and (residual.shape != x.shape or residual.device != x.device):
        raise ValueError(f"residual {tuple(residual.shape)} must match x {tuple(x.shape)}")
    out, out_scale = _outputs(x, hidden, out, out_scale)
    x2, out2 = as_rows(x, hidden, "x"), as_rows(out, hidden, "out")
    res2 = x2 if residual is None else as_rows(residual, hidden, "residual")
    if x2.shape[0] == 0:
        return out, out_scale
    block = next_pow2(hidden)
    _rms_norm_quant_kernel[(x2.shape[0],)](
        x2, res2, weight, out2, out_scale, eps, hidden, x2.stride(0), res2.stride(0),
        out2.stride(0), FP8_MAX_=FP8_MAX, MIN_SCALE_=MIN_SCALE,
        HAS_RESIDUAL=residual is not None, BLOCK=block, num_warps=num_warps_for(block),
    )  # fmt: skip
    return out, out_scale


def _launch_rows(
    x: torch.Tensor, width: int, gated: bool, out: torch.Tensor | None, scale: torch.Tensor | None
) -> Quantized:
    out, scale = _outputs(x, width, out, scale)
    x2 = as_rows(x, x.shape[-1], "x")
    out2 = as_rows(out, width, "out")
    if x2.shape[0] == 0 or width == 0:
        return out, scale.fill_(MIN_SCALE)
    block = min(next_pow2(width), _CHUNK)
    _silu_mul_quant_kernel[(x2.shape[0],)](
        x2, out2, scale, width, width, x2.stride(0), out2.stride(0), FP8_MAX_=FP8_MAX,
        MIN_SCALE_=MIN_SCALE, GATED=gated, BLOCK=block, num_warps=num_warps_for(block),
    )  # fmt: skip
    return out, scale


def silu_and_mul_quant_triton(
    x: torch.Tensor, out: torch.Tensor | None = None, out_scale: torch.Tensor | None = None
) -> Quantized:
    """Fused ``silu(gate) * up`` emitting e4m3 rows and their scales (no bf16 intermediate)."""
    if x.shape[-1] % 2:
        raise ValueError(f"x must end in an even dimension (gate then up), got {tuple(x.shape)}")
    return _launch_rows(x, x.shape[-1] // 2, True, out, out_scale)


def quantize_fp8_triton(
    x: torch.Tensor, out: torch.Tensor | None = None, out_scale: torch.Tensor | None = None
) -> Quantized:
    """Per-row e4m3 quantization in one kernel (one read of ``x``, from cache the second time)."""
    return _launch_rows(x, x.shape[-1], False, out, out_scale)
