"""Memory prediction: the largest dense batch whose KV cache fits beside the weights.

A bigger dense batch runs more decodes at once, and each holds its context in the cache; past
the point where that no longer fits, the engine preempts and recomputes, which the cost model
does not see. So the search never proposes such a batch.
"""

from __future__ import annotations

from nanoflow.autotune.steady_state import SteadyBatch, WorkloadShape, steady_batch
from nanoflow.models.spec import ModelSpec

ACTIVATION_SLACK_BYTES = 2 << 30  # the engine's allowance for activations and allocator slack


def weight_bytes(spec: ModelSpec, dtype_bytes: int = 2) -> int:
    return spec.num_parameters() * dtype_bytes


def kv_bytes_needed(spec: ModelSpec, batch: SteadyBatch, kv_dtype_bytes: int = 2) -> float:
    """K/V of every running decode at its average context, plus this iteration's prompt tokens."""
    tokens = batch.decodes * batch.decode_context + batch.prefill_tokens
    return tokens * spec.kv_bytes_per_token(kv_dtype_bytes)


def kv_bytes_available(
    spec: ModelSpec, gpu_memory_bytes: int, utilization: float = 0.9, dtype_bytes: int = 2
) -> float:
    return gpu_memory_bytes * utilization - weight_bytes(spec, dtype_bytes) - ACTIVATION_SLACK_BYTES


def kv_fits(
    spec: ModelSpec,
    gpu_memory_bytes: int,
    shape: WorkloadShape,
    dense_batch_size: int,
    utilization: float = 0.9,
    dtype_bytes: int = 2,
    kv_dtype_bytes: int | None = None,
) -> bool:
    """``dtype_bytes`` is the weights' element size, ``kv_dtype_bytes`` the cache's (default the
    same): an fp8 cache holds twice the tokens."""
    batch = steady_batch(dense_batch_size, shape)
    needed = kv_bytes_needed(spec, batch, kv_dtype_bytes or dtype_bytes)
    return needed <= kv_bytes_available(spec, gpu_memory_bytes, utilization, dtype_bytes)
