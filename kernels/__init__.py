"""nanoflow.kernels: the engine's hot-path kernels, each a Triton kernel beside a PyTorch reference.

The functions here pick the implementation: Triton for CUDA tensors, the reference otherwise.
``NANOFLOW_KERNELS=reference`` forces the references everywhere (the sequential baseline of an
ablation); ``NANOFLOW_KERNELS=triton`` forces Triton, which with ``TRITON_INTERPRET=1`` runs on CPU
tensors in tests. GEMMs on a GPU go to cuBLAS (SM-limited by the execution unit's carve-out or
green context) unless ``NANOFLOW_GEMM=persistent`` picks the persistent Triton GEMM, whose
program count is the SM budget itself.
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
from nanoflow.kernels.fused_moe import fused_moe_ref
from nanoflow.kernels.gemm import linear_cublas, linear_ref
from nanoflow.kernels.prefill_attention import paged_prefill_attention_ref
from nanoflow.kernels.rms_norm import rms_norm_ref
from nanoflow.kernels.rotary import rope_kv_write_ref

_TRITON_NAMES = {
    "paged_decode_attention": (
        "nanoflow.kernels.decode_attention",
        "paged_decode_attention_triton",
    ),
    "paged_prefill_attention": (
        "nanoflow.kernels.prefill_attention",
        "paged_prefill_attention_triton",
    ),
    "rms_norm": ("nanoflow.kernels.rms_norm", "rms_norm_triton"),
    "rope_kv_write": ("nanoflow.kernels.rotary", "rope_kv_write_triton"),
    "silu_and_mul": ("nanoflow.kernels.activation", "silu_and_mul_triton"),
    "linear": ("nanoflow.kernels.gemm", "linear_triton"),
    "fused_moe": ("nanoflow.kernels.fused_moe", "fused_moe_triton"),
}
_REFERENCES: dict[str, Callable[..., Any]] = {
    "paged_decode_attention": paged_decode_attention_ref,
    "paged_prefill_attention": paged_prefill_attention_ref,
    "rms_norm": rms_norm_ref,
    "rope_kv_write": rope_kv_write_ref,
    "silu_and_mul": silu_and_mul_ref,
    "linear": linear_ref,
    "fused_moe": fused_moe_ref,
}


def backend_for(tensor: torch.Tensor) -> str:
    """``triton`` or ``reference`` for a kernel whose main input is ``tensor``."""
    forced = os.environ.get("NANOFLOW_KERNELS", "auto")
    if forced in ("reference", "triton"):
        return forced
    return "triton" if tensor.is_cuda else "reference"


@functools.cache
def _resolve(name: str, backend: str) -> Callable[..., Any]:
    """Cached, so a launch pays one dict lookup, not an import, on the hot path."""
    if backend == "reference":
        return _REFERENCES[name]
    module, attr = _TRITON_NAMES[name]
    return getattr(importlib.import_module(module), attr)


def _implementation(name: str, tensor: torch.Tensor) -> Callable[..., Any]:
    return _resolve(name, backend_for(tensor))


def paged_decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    num_ctas: int | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    return _implementation("paged_decode_attention", q)(
        q, k_cache, v_cache, block_tables, context_lens, scale, num_ctas, out
    )


def paged_prefill_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    cu_q_lens: torch.Tensor,
    context_lens: torch.Tensor,
    max_q_len: int,
    scale: float,
    num_ctas: int | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    return _implementation("paged_prefill_attention", q)(
        q, k_cache, v_cache, block_tables, cu_q_lens, context_lens, max_q_len, scale, num_ctas, out
    )


def rms_norm(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    residual: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    return _implementation("rms_norm", x)(x, weight, eps, residual, out)


def rope_kv_write(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    positions: torch.Tensor,
    cos_sin_cache: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    return _implementation("rope_kv_write", q)(
        q, k, v, positions, cos_sin_cache, k_cache, v_cache, slot_mapping
    )


def silu_and_mul(x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    return _implementation("silu_and_mul", x)(x, out)


def linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    num_ctas: int | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    if x.is_cuda and os.environ.get("NANOFLOW_GEMM", "cublas") == "cublas":
        return linear_cublas(x, weight, bias, num_ctas, out)
    return _implementation("linear", x)(x, weight, bias, num_ctas, out)


def fused_moe(
    x: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    num_ctas: int | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    return _implementation("fused_moe", x)(x, w13, w2, topk_weights, topk_ids, num_ctas, out)
