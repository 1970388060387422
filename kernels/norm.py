"""RMSNorm with the residual add fused in front of it (one pass over the hidden states)."""

from __future__ import annotations

import torch

from nanoflow.kernels._compat import as_rows, jit, next_pow2, num_warps_for, tl


def rms_norm_ref(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    residual: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """``out = rmsnorm(x + residual) * weight``; with ``residual`` given, it is updated in place
    to ``x + residual`` (the stream the next layer adds to)."""
    if residual is not None:
        residual.add_(x)
        x = residual
    xf = x.float()
    normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    result = (normed * weight.float()).to(x.dtype)
    if out is None:
        return result
    out.copy_(result)
    return out


@jit
def _rms_norm_kernel(
    x_ptr, res_ptr, w_ptr, out_ptr, eps, n_cols, stride_x, stride_r, stride_o,
    HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    """One row per program."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    x, y = residual_rms_norm_row(
        x_ptr, res_ptr, w_ptr, row, cols, mask, eps, n_cols, stride_x, stride_r, HAS_RESIDUAL
    )
    y = y.to(x.dtype)
    tl.store(out_ptr + row * stride_o + cols, y.to(out_ptr.dtype.element_ty), mask=mask)


@jit
def residual_rms_norm_row(
    x_ptr, res_ptr, w_ptr, row, cols, mask, eps, n_cols, stride_x, stride_r,
    HAS_RESIDUAL: tl.constexpr,
):  # fmt: skip
    """A row's input (the residual sum, stored, where there is one) and its normalised values in
    fp32. The sum is rounded to the residual's dtype before the norm, exactly as the
    reference's in-place ``residual.add_``."""
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(res_ptr + row * stride_r + cols, mask=mask, other=0.0)
        x = (x.to(tl.float32) + r.to(tl.float32)).to(res_ptr.dtype.element_ty)
        tl.store(res_ptr + row * stride_r + cols, x, mask=mask)
    xf = x.to(tl.float32)
    rstd = tl.rsqrt(tl.sum(xf * xf, 0) / n_cols + eps)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    return x, xf * rstd * w


def rms_norm_triton(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    residual: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Residual add + RMSNorm in one pass over the hidden states (one program per row)."""
    hidden = x.shape[-1]
    if weight.shape != (hidden,):
        raise ValueError(f"weight must be [{hidden}], got {tuple(weight.shape)}")
    source = x if residual is None else residual
    if residual is not None and residual.shape != x.shape:
        raise ValueError(f"residual {tuple(residual.shape)} must match x {tuple(x.shape)}")
    if out is None:
        out = torch.empty_like(source)
    if out.shape != x.shape:
        raise ValueError(f"out {tuple(out.shape)} must match x {tuple(x.shape)}")
    tensors = [t for t in (x, weight, residual, out) if t is not None]
    if any(t.device != x.device for t in tensors):
        raise ValueError("x, weight, residual and out must be on the same device")
    x2, out2 = as_rows(x, hidden, "x"), as_rows(out, hidden, "out")
    res2 = x2 if residual is None else as_rows(residual, hidden, "residual")
    if x2.shape[0] == 0:
        return out
    block = next_pow2(hidden)
    _rms_norm_kernel[(x2.shape[0],)](
        x2, res2, weight, out2, eps, hidden, x2.stride(0), res2.stride(0), out2.stride(0),
        HAS_RESIDUAL=residual is not None, BLOCK=block, num_warps=num_warps_for(block),
    )  # fmt: skip
    return out
