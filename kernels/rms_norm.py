"""RMSNorm with the residual add fused in front of it (one pass over the hidden states)."""

from __future__ import annotations

import torch


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
