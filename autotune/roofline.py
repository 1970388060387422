"""Op tables from a roofline instead of a GPU: each op's FLOPs and bytes over nominal H100
ceilings (docs/architecture.md, "Measuring"), with small GEMMs less efficient and memory-bound
kernels needing about a third of the SMs to reach full bandwidth.

Not a substitute for profiling: they let the whole tuning path (search, validation, profile)
run on a CPU, and give a search its shape before a GPU is at hand.
"""

from __future__ import annotations

import datetime
from collections.abc import Callable

from nanoflow.autotune.tables import OpTable, OpTables
from nanoflow.errors import ConfigError
from nanoflow.models.spec import ModelSpec
from nanoflow.runtime.graph import (
    DECODE_ATTENTION,
    PREFILL_ATTENTION,
    OpSpec,
    Resource,
    Rows,
    llama_graph,
)

TOKENS = (16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192)
CONTEXTS = (128, 256, 512, 1024, 2048, 4096)
LATENCY_S = 4e-6
SATURATING_SM_FRACTION = 0.3
GEMM_HALF_EFFICIENCY_ROWS = 128  # rows at which a GEMM reaches half its peak rate


def _sm_grid(sm_count: int) -> tuple[int, ...]:
    return tuple(sorted({*range(8, sm_count, 8), sm_count}))


def _compute_time(flops: float, weight_bytes: float, rows: float, frac: float, hw: dict) -> float:
    efficiency = rows / (rows + GEMM_HALF_EFFICIENCY_ROWS)
    math_s = flops / (hw["flops"] * frac * efficiency)
    load_s = weight_bytes / (hw["bytes"] * min(1.0, frac / SATURATING_SM_FRACTION))
    return LATENCY_S + max(math_s, load_s)


def _memory_time(nbytes: float, frac: float, hw: dict) -> float:
    return LATENCY_S + nbytes / (hw["bytes"] * min(1.0, frac / SATURATING_SM_FRACTION))


def _op_seconds(spec: ModelSpec, b: int, kv_b: int) -> dict[str, Callable]:
    """seconds(tokens, context, sm fraction, hw) of each op of the dense layer graph; ``b`` and
    ``kv_b`` are the weights' and the KV cache's element sizes."""
    h, q, kv, i = spec.hidden_size, spec.q_size, spec.kv_size, spec.intermediate_size

    def gemm(n_in: int, n_out: int) -> Callable:
        return lambda t, c, f, hw: _compute_time(2 * t * n_in * n_out, b * n_in * n_out, t, f, hw)

    def stream(bytes_per_token: int) -> Callable:
        return lambda t, c, f, hw: _memory_time(t * bytes_per_token, f, hw)

    return {
        "input_norm": stream(4 * h * b),
        "qkv_proj": gemm(h, q + 2 * kv),
        "rope_kv_write": stream(2 * (q + 2 * kv) * b),
        DECODE_ATTENTION: lambda t, c, f, hw: _memory_time(t * c * 2 * kv * kv_b, f, hw),
        PREFILL_ATTENTION: lambda t, c, f, hw: _compute_time(
            2 * t * c * q, t * c * 2 * kv * kv_b / max(1, c), t, f, hw),
        "o_proj": gemm(q, h),
        "post_attn_norm": stream(4 * h * b),
        "gate_up_proj": gemm(h, 2 * i),
        "silu_mul": stream(3 * i * b),
        "down_proj": gemm(i, h),
    }  # fmt: skip


def roofline_tables(
    spec: ModelSpec,
    model: str,
    sm_count: int = 132,
    gpu_memory_bytes: int = 80 * 2**30,
    tflops: float = 800.0,
    tbps: float = 3.0,
    dtype_bytes: int = 2,
    launch_seconds: float = 10e-6,
    kv_dtype_bytes: int | None = None,
) -> OpTables:
    if spec.is_moe:
        raise ConfigError("roofline tables cover dense Llama-family models; profile MoE on a GPU")
    hw = {"flops": tflops * 1e12, "bytes": tbps * 1e12}
    sms = _sm_grid(sm_count)

    def table(op: OpSpec, fn: Callable) -> OpTable:
        contexts = CONTEXTS if op.rows is not Rows.ALL else (0,)
        seconds = tuple(
            tuple(tuple(fn(t, c, s / sm_count, hw) for s in sms) for c in contexts) for t in TOKENS
        )
        return OpTable(op, TOKENS, contexts, sms, seconds)

    h, v = spec.hidden_size, spec.vocab_size
    lm_head = OpSpec("lm_head", Resource.COMPUTE)
    lm_seconds = lambda t, c, f, hw: _compute_time(2 * t * h * v, dtype_bytes * h * v, t, f, hw)
    op_seconds = _op_seconds(spec, dtype_bytes, kv_dtype_bytes or dtype_bytes)
    return OpTables(
        model=model,
        architecture_hash=spec.architecture_hash(),
        gpu=None,
        sm_count=sm_count,
        gpu_memory_bytes=gpu_memory_bytes,
        num_layers=spec.num_layers,
        dtype_bytes=dtype_bytes,
        ops=tuple(table(op, op_seconds[op.name]) for op in llama_graph().ops),
        lm_head=table(lm_head, lm_seconds),
        interference={
            "cta_limit": {"compute+memory": 1.15, "compute+network": 1.05},
            "green_context": {"compute+memory": 1.05, "compute+network": 1.02},
        },
        launch_seconds=launch_seconds,
        date=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        kv_dtype_bytes=kv_dtype_bytes,
    )
