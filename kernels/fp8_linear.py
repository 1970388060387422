"""FP8 (e4m3) linear layers, W8A8: weights with one fp32 scale per output channel, activations
with one scale per token row, computed on the fly."""

from __future__ import annotations

from dataclasses import dataclass

import torch

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8_DTYPE).max
# the smallest scale a row gets: an all-zero row must not divide by zero, and a scale this small
# still maps the largest fp16 subnormals into e4m3's range
MIN_SCALE = 1.0 / (FP8_MAX * 512.0)


@dataclass(frozen=True)
class Fp8Weight:
    """An ``[N, K]`` weight as e4m3 ``data`` with an fp32 ``scale`` per output channel
    (``[N]``): ``w ≈ data * scale[:, None]``; or a stack of experts' weights, ``[E, N, K]``
    with scales ``[E, N]``."""

    data: torch.Tensor
    scale: torch.Tensor

    def __post_init__(self) -> None:
        if self.data.dtype != FP8_DTYPE or self.data.dim() not in (2, 3):
            raise ValueError(f"data must be a 2-D or 3-D {FP8_DTYPE} tensor, got {self.data.dtype}")
        if self.scale.dtype != torch.float32 or self.scale.shape != self.data.shape[:-1]:
            raise ValueError(
                f"scale must be float32 {list(self.data.shape[:-1])}, got {self.scale.dtype} "
                f"{tuple(self.scale.shape)}"
            )

    @property
    def shape(self) -> torch.Size:
        return self.data.shape

    @property
    def device(self) -> torch.device:
        return self.data.device

    @property
    def nbytes(self) -> int:
        return self.data.nbytes + self.scale.nbytes

    def to(self, device: torch.device | str) -> Fp8Weight:
        return Fp8Weight(self.data.to(device), self.scale.to(device))

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return (self.data.float() * self.scale.unsqueeze(-1)).to(dtype)


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row of ``x`` (``[..., K]``) as e4m3 with its own fp32 scale (``[...]``), the row's
    largest magnitude mapped to e4m3's largest value."""
    xf = x.float()
    scale = (xf.abs().amax(-1) / FP8_MAX).clamp_min(MIN_SCALE)
    data = (xf / scale.unsqueeze(-1)).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return data, scale


def quantize_weight(weight: torch.Tensor) -> Fp8Weight:
    """Per-output-channel e4m3 scales of a bf16/fp32 ``[N, K]`` weight, computed at load time."""
    data, scale = quantize_rows(weight)
    return Fp8Weight(data.contiguous(), scale.contiguous())


def _write(result: torch.Tensor, out: torch.Tensor | None) -> torch.Tensor:
    if out is None:
        return result
    return out.copy_(result)


def fp8_linear_ref(
    x: torch.Tensor,
    weight: Fp8Weight,
    bias: torch.Tensor | None = None,
    num_ctas: int | None = None,
    out: torch.Tensor | None = None,
    x_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """Reference: dequantize both sides, then matmul in fp32. ``x`` is the activation in the
    model's dtype (quantized per token here), or already e4m3 with its row scales ``x_scale``."""
    if x.dtype == FP8_DTYPE:
        if x_scale is None:
            raise ValueError("an e4m3 x needs its row scales x_scale")
        data, scale = x, x_scale
        out_dtype = out.dtype if out is not None else torch.bfloat16
    else:
        data, scale = quantize_rows(x)
        out_dtype = x.dtype
    xf = data.float() * scale.unsqueeze(-1)
    y = xf @ weight.dequantize().t()
    if bias is not None:
        y += bias.float()
    return _write(y.to(out_dtype), out)


def fp8_linear_cublas(
    x: torch.Tensor,
    weight: Fp8Weight,
    bias: torch.Tensor | None = None,
    num_ctas: int | None = None,
    out: torch.Tensor | None = None,
    x_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """The row-scaled e4m3 GEMM of ``torch._scaled_mm`` (bf16 out). Like the bf16 path,
    ``num_ctas`` is left to the execution unit: a green context bounds any kernel, and whether
    this GEMM honours an SM carve-out is measured by ``experiments/fp8_bench.py``. An activation
    in the model's dtype is quantized per token first."""
    if x.dtype != FP8_DTYPE:
        x, x_scale = quantize_rows(x)
    elif x_scale is None:
        raise ValueError("an e4m3 x needs its row scales x_scale")
    x2 = x.reshape(-1, x.shape[-1])
    n = weight.shape[0]
    if x2.shape[0] == 0:
        return out if out is not None else x.new_empty(*x.shape[:-1], n, dtype=torch.bfloat16)
    if x_scale.data_ptr() % 16:  # a nano-batch's rows may start anywhere in the step's scales
        x_scale = x_scale.clone()
    args = (x2, weight.data.t(), x_scale.reshape(-1, 1), weight.scale.view(1, n))
    bias = None if bias is None else bias.to(torch.bfloat16)
    if out is not None and out.dtype == torch.bfloat16 and out.is_contiguous():
        torch._scaled_mm(*args, bias=bias, out_dtype=torch.bfloat16, out=out.view(-1, n))
        return out
    y = torch._scaled_mm(*args, bias=bias, out_dtype=torch.bfloat16)
    return _write(y.view(*x.shape[:-1], n), out)
