"""SiLU-and-mul: the gated activation of Llama's MLP, ``silu(gate) * up`` from one fused GEMM."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def silu_and_mul_ref(x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """``x`` is ``[T, 2*I]`` (gate then up); returns ``[T, I]``."""
    half = x.shape[-1] // 2
    result = (F.silu(x[..., :half].float()) * x[..., half:].float()).to(x.dtype)
    if out is None:
        return result
    out.copy_(result)
    return out
