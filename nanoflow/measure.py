"""Measured ceilings and the run's environment, recorded beside every result we quote."""

from __future__ import annotations

import datetime
import platform
from typing import Any

import torch

from nanoflow.kernels.decode_attention import forced_config
from nanoflow.models.spec import ModelSpec


def environment(device: torch.device) -> dict[str, Any]:
    env: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "device": str(device),
    }
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    env["versions"] = {"torch": env["torch"], "triton": env["triton"], "python": env["python"]}
    if forced_config():  # a decode launch configuration forced for an experiment
        env["decode_config_override"] = forced_config()
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(
            gpu=props.name,
            sm_count=props.multi_processor_count,
            gpu_memory_gib=round(props.total_memory / 2**30, 1),
            cuda=torch.version.cuda,
        )
    else:
        env["gpu"] = None
    return env


# about a millisecond of spinning on an H100: longer than launching one op from Python
_QUEUE_AHEAD_CYCLES = 2_000_000
_L2_FLUSH_BYTES = 256 << 20  # several times the L2 of an H100 or H200 (50-60 MB)


def time_cuda(
    fn, iters: int = 20, warmup: int = 3, queue_ahead: bool = False, flush_l2: bool = False
) -> float:
    """Median seconds of ``fn`` on the current stream, timed with CUDA events.

    ``queue_ahead`` holds the stream with a spin kernel while ``fn`` is launched, so the events
    time the GPU's work alone; without it a kernel shorter than its own host launch is timed as
    the launch, which is right for eager execution and wrong for a replayed CUDA graph.
    ``flush_l2`` overwrites more than the L2 cache before each run, so ``fn`` reads from HBM.
    """
    for _ in range(warmup):
        fn()
    scratch = torch.empty(_L2_FLUSH_BYTES, dtype=torch.uint8, device="cuda") if flush_l2 else None
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        if scratch is not None:
            scratch.zero_()
        if queue_ahead:
            torch.cuda._sleep(_QUEUE_AHEAD_CYCLES)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return sorted(times)[len(times) // 2]


def gemm_ceiling_tflops(device: torch.device, n: int = 8192) -> float:
    """bf16 dense GEMM rate on random data (the compute ceiling, docs/architecture.md)."""
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    seconds = time_cuda(lambda: a @ b)
    return 2 * n**3 / seconds / 1e12


def copy_bandwidth_gbs(device: torch.device, gib: float = 2.0) -> float:
    """Device-to-device copy rate, bytes read + written (the memory ceiling)."""
    n = int(gib * 2**30) // 2
    src = torch.randn(n, device=device, dtype=torch.bfloat16)
    dst = torch.empty_like(src)
    seconds = time_cuda(lambda: dst.copy_(src))
    return 2 * n * 2 / seconds / 1e9


def token_agreement(tokens: list[list[int]], reference: list[list[int]]) -> float:
    """Fraction of requests whose generated tokens equal the reference's exactly."""
    return sum(a == b for a, b in zip(tokens, reference, strict=True)) / len(tokens)


def optimal_throughput(spec: ModelSpec, gemm_flops_per_s: float) -> float:
    """NanoFlow's bound for compute-bound serving: tokens/s = GEMM rate / (2 x params per token)."""
    return gemm_flops_per_s / (2 * spec.params_per_token())


def iteration_bound_seconds(
    spec: ModelSpec,
    num_tokens: int,
    kv_tokens: int,
    gemm_flops_per_s: float,
    bytes_per_s: float,
    shards: int = 1,
    dtype_bytes: int = 2,
    kv_dtype_bytes: int | None = None,
) -> float:
    """The least time one iteration can take on a GPU: its GEMM FLOPs at the GEMM rate, or the
    bytes it must move (every weight once, the K/V of the ``kv_tokens`` it attends to, the K/V it
    writes) at the copy rate, whichever is longer; split over ``shards`` tensor-parallel GPUs.
    Where NanoFlow's optimal figure assumes a batch large enough to be compute-bound, this holds
    for the batch actually run. Attention FLOPs are left out (a few percent at these contexts).
    ``kv_dtype_bytes`` is the KV cache's element size (the weights' by default)."""
    flops = 2 * spec.params_per_token() * num_tokens
    lookup_only = 0 if spec.tie_word_embeddings else spec.vocab_size * spec.hidden_size
    weight_bytes = (spec.num_parameters() - lookup_only) * dtype_bytes
    kv_bytes = (kv_tokens + num_tokens) * spec.kv_bytes_per_token(kv_dtype_bytes or dtype_bytes)
    return max(flops / gemm_flops_per_s, (weight_bytes + kv_bytes) / bytes_per_s) / shards
