"""nanoflow.kernels: the engine's hot-path kernels, each a Triton kernel beside a PyTorch reference.

The functions here pick the implementation: Triton for CUDA tensors, the reference otherwise.
``NANOFLOW_KERNELS=reference`` forces the references everywhere (the sequential baseline of an
ablation); ``NANOFLOW_KERNELS=triton`` forces Triton, which with ``TRITON_INTERPRET=1`` runs on CPU
tensors in tests. GEMMs on a GPU go to cuBLAS (SM-limited by the execution unit's carve-out or
green context) unless ``NANOFLOW_GEMM=persistent`` picks the persistent Triton GEMM, whose
program count is the SM budget itself. MoE experts in bf16 on a GPU run on grouped GEMMs
(``moe_grouped.py``) unless ``NANOFLOW_MOE=triton`` picks the fused Triton kernel; FP8 experts
always take the grouped path. The switches are read once, at import; ``set_backend`` and
``set_moe_backend`` change them in a running process.
"""

from __future__ import annotations

import functools
import importlib
import os
from collections.abc import Callable
from typing import Any

import torch

from nanoflow.kernels.activation import silu_and_mul_ref
from nanoflow.kernels.decode_attention import paged_decode_attention_ref
from nanoflow.kernels.fp8_linear import Fp8Weight, fp8_linear_cublas, fp8_linear_ref
from nanoflow.kernels.gemm import linear_cublas, linear_ref
from nanoflow.kernels.moe import fused_moe_ref
from nanoflow.kernels.norm import rms_norm_ref
from nanoflow.kernels.prefill_attention import paged_prefill_attention_ref
from nanoflow.kernels.quant import quantize_fp8_ref, rms_norm_quant_ref, silu_and_mul_quant_ref
from nanoflow.kernels.rotary import rope_kv_write_ref
from nanoflow.kernels.seeded_noise import seeded_exponential_ref

BACKENDS = ("auto", "reference", "triton")
MOE_BACKENDS = ("grouped", "triton")
_CUBLAS_GEMM = os.environ.get("NANOFLOW_GEMM", "cublas") == "cublas"
_forced = os.environ.get("NANOFLOW_KERNELS", "auto")
_moe_backend = os.environ.get("NANOFLOW_MOE", "grouped")


def set_backend(name: str) -> None:
    """``reference`` or ``triton`` for every kernel, or ``auto``: Triton for CUDA tensors."""
    global _forced
    if name not in BACKENDS:
        raise ValueError(f"kernel backend must be one of {BACKENDS}, got {name!r}")
    _forced = name


def set_moe_backend(name: str) -> None:
    """``grouped`` (grouped GEMMs) or ``triton`` (the fused Triton kernel) for bf16 experts."""
    global _moe_backend
    if name not in MOE_BACKENDS:
        raise ValueError(f"MoE backend must be one of {MOE_BACKENDS}, got {name!r}")
    _moe_backend = name


def backend_for(tensor: torch.Tensor) -> str:
    """``triton`` or ``reference`` for a kernel whose main input is ``tensor``."""
    if _forced != "auto":
        return _forced
    return "triton" if tensor.is_cuda else "reference"


@functools.cache
def _triton(module: str, attr: str) -> Callable[..., Any]:
    """Cached, so a launch pays one dict lookup, not an import, on the hot path."""
    return getattr(importlib.import_module(f"nanoflow.kernels.{module}"), attr)


def _dispatch(reference: Callable[..., Any], module: str) -> Callable[..., Any]:
    """The kernel under the reference's name and signature: the reference, or the Triton
    kernel of ``module`` for the device of its first argument."""
    triton_name = reference.__name__.removesuffix("_ref") + "_triton"

    @functools.wraps(reference)
    def kernel(x: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        if backend_for(x) == "reference":
            return reference(x, *args, **kwargs)
        return _triton(module, triton_name)(x, *args, **kwargs)

    kernel.__name__ = kernel.__qualname__ = triton_name.removesuffix("_triton")
    return kernel


paged_decode_attention = _dispatch(paged_decode_attention_ref, "decode_attention")
paged_prefill_attention = _dispatch(paged_prefill_attention_ref, "prefill_attention")
rms_norm = _dispatch(rms_norm_ref, "norm")
rope_kv_write = _dispatch(rope_kv_write_ref, "rotary")
silu_and_mul = _dispatch(silu_and_mul_ref, "activation")
_fused_moe = _dispatch(fused_moe_ref, "moe")
rms_norm_quant = _dispatch(rms_norm_quant_ref, "quant")
silu_and_mul_quant = _dispatch(silu_and_mul_quant_ref, "quant")
quantize_fp8 = _dispatch(quantize_fp8_ref, "quant")
_linear = _dispatch(linear_ref, "gemm")
seeded_exponential = _dispatch(seeded_exponential_ref, "seeded_noise")


def linear(x: torch.Tensor, weight: Any, *args: Any, **kwargs: Any) -> torch.Tensor:
    """``linear_ref``'s ``x @ weight.T (+ bias)``; ``weight`` is a tensor, or an
    :class:`Fp8Weight` (``torch._scaled_mm`` on a GPU whichever GEMM backend is set, the
    reference elsewhere)."""
    if isinstance(weight, Fp8Weight):
        if x.is_cuda:
            return fp8_linear_cublas(x, weight, *args, **kwargs)
        return fp8_linear_ref(x, weight, *args, **kwargs)
    if x.is_cuda and _CUBLAS_GEMM:
        return linear_cublas(x, weight, *args, **kwargs)
    return _linear(x, weight, *args, **kwargs)


linear.__name__ = linear.__qualname__ = "linear"


def fused_moe(
    x: torch.Tensor,
    w13: Any,
    w2: Any,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    num_ctas: int | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """``fused_moe_ref``'s MoE MLP; ``w13`` and ``w2`` are tensors, or :class:`Fp8Weight`
    stacks of e4m3 experts (the grouped path on every device, its references off the GPU)."""
    args = (x, w13, w2, topk_weights, topk_ids, num_ctas, out)
    if isinstance(w13, Fp8Weight):
        return _triton("moe_grouped", "fused_moe_fp8")(*args)
    grouped = x.is_cuda and x.dtype == torch.bfloat16 and _moe_backend == "grouped"
    if grouped and backend_for(x) == "triton":
        return _triton("moe_grouped", "fused_moe_grouped")(*args)
    return _fused_moe(*args)


fused_moe.__name__ = fused_moe.__qualname__ = "fused_moe"
