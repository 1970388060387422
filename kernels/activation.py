"""SiLU-and-mul: the gated activation of Llama's MLP, ``silu(gate) * up`` from one fused GEMM."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from nanoflow.kernels._compat import as_rows, cdiv, jit, next_pow2, num_warps_for, tl


def silu_and_mul_ref(x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """``x`` is ``[T, 2*I]`` (gate then up); returns ``[T, I]``."""
    half = x.shape[-1] // 2
    result = (F.silu(x[..., :half].float()) * x[..., half:].float()).to(x.dtype)
    if out is None:
        return result
    out.copy_(result)
    return out


@jit
def _silu_and_mul_kernel(
    x_ptr, out_ptr, n_cols, stride_x, stride_o, BLOCK: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n_cols
    gate = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(x_ptr + row * stride_x + n_cols + cols, mask=mask, other=0.0).to(tl.float32)
    y = (gate * tl.sigmoid(gate) * up).to(x_ptr.dtype.element_ty)
    tl.store(out_ptr + row * stride_o + cols, y.to(out_ptr.dtype.element_ty), mask=mask)


def silu_and_mul_triton(x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """Fused ``silu(gate) * up``: one read of the GEMM output, one write, no fp32 temporaries."""
    if x.shape[-1] % 2:
        raise ValueError(f"x must end in an even dimension (gate then up), got {tuple(x.shape)}")
    half = x.shape[-1] // 2
    if out is None:
        out = x.new_empty(*x.shape[:-1], half)
    if out.shape != (*x.shape[:-1], half) or out.device != x.device:
        raise ValueError(f"out must be {(*x.shape[:-1], half)} on {x.device}, got {out.shape}")
    x2, out2 = as_rows(x, 2 * half, "x"), as_rows(out, half, "out")
    if x2.shape[0] == 0 or half == 0:
        return out
    # 16 elements a thread: two 16-byte loads of the gate and two of the up half in flight
    block = min(next_pow2(half), 4096)
    _silu_and_mul_kernel[(x2.shape[0], cdiv(half, block))](
        x2, out2, half, x2.stride(0), out2.stride(0), BLOCK=block,
        num_warps=num_warps_for(block, per_thread=16),
    )  # fmt: skip
    return out
