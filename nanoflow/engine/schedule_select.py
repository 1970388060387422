"""Which pipeline schedule and token budget an engine runs with: a tuning profile when given,
else the executor the user asked for, else the hand-written default for the device."""

from __future__ import annotations

import torch

from nanoflow.config import EngineConfig
from nanoflow.errors import ProfileError
from nanoflow.models.spec import ModelSpec
from nanoflow.runtime.schedule import (
    PipelineSchedule,
    nano_batch_schedule,
    sequential_schedule,
    shared_sm_schedule,
)
from nanoflow.runtime.units import device_sm_count

DEFAULT_TOKEN_BUDGET = 2048


def select_schedule(
    config: EngineConfig, spec: ModelSpec, device: torch.device
) -> tuple[PipelineSchedule, int, str]:
    """(schedule, per-iteration token budget, a line saying where they came from)."""
    budget = config.max_num_batched_tokens or DEFAULT_TOKEN_BUDGET
    executor = config.executor
    if config.profile is not None:
        from nanoflow.runtime.profile import load_profile

        profile = load_profile(config.profile, spec.architecture_hash(), device)
        if profile.kv_cache_dtype != config.kv_cache_dtype:
            raise ProfileError(
                f"profile {config.profile} was tuned for the {profile.kv_cache_dtype!r} KV cache, "
                f"the engine is set to {config.kv_cache_dtype!r}: pass --kv-cache-dtype "
                f"{profile.kv_cache_dtype} or tune with --kv-cache-dtype {config.kv_cache_dtype}"
            )
        if profile.quantization != config.quantization:
            raise ProfileError(
                f"profile {config.profile} was tuned with quantization={profile.quantization!r}, "
                f"the engine is set to {config.quantization!r}: run with the profile's "
                "--quantization, or tune a profile with the engine's"
            )
        budget = config.max_num_batched_tokens or profile.dense_batch_size
        schedule = profile.schedule
        if executor == "sequential":
            return sequential_schedule(), budget, "sequential executor (profile's budget)"
        if executor == "nanobatch":
            return _without_overlap(schedule), budget, f"profile {config.profile}, no overlap"
        return schedule, budget, f"profile {config.profile}"
    if executor in ("auto", "sequential"):
        return (
            sequential_schedule(),
            budget,
            "sequential executor (no profile given; `nanoflow tune` makes one that overlaps "
            "where that measures faster, or pass --executor overlapped)",
        )
    if executor == "nanobatch":
        return nano_batch_schedule(2), budget, "2 nano-batches without overlap (no profile)"
    return architecture_schedule(config, device), budget, "hand-written overlapped schedule"


def architecture_schedule(config: EngineConfig, device: torch.device) -> PipelineSchedule:
    """The overlapped schedule used without a profile.

    The one that measured fastest of those tried on an H100 (llama-3-8b, CUDA graphs,
    `experiments/results/nvidia-h100-80gb-hbm3/pipeline/{schedules,decode_only}.json`):
    GEMMs keep the whole GPU and decode attention alone runs beside them on a high-priority
    stream with half of the SMs' worth of CTAs: 55.9 ms for 512 decodes at context 640 plus
    1536 prompt tokens (three quarters: 68.5 ms; a green-context split of 88/44 SMs: 84 ms), and
    36.6 ms for 512 decodes at context 800 alone. The sequential executor took 53.6 and 29.5 ms
    in the same runs. On an H200, for 1024 decodes at context 768 plus 1024 prompt tokens, the
    alternating launch order took this layout from 71.1 ms (`nvidia-h200/pipeline/mixed.json`)
    to 65.9 ms (`…/alternating_mixed.json`, beside sequential at 62.2 ms and green
    contexts of 96/36 or 100/32 SMs at 65.6): no overlapped layout has beaten sequential on
    these GPUs with this model yet (docs/findings.md). Tensor
    parallelism adds a small network unit for the collectives.
    """
    sms = device_sm_count(device) if device.type == "cuda" else 132
    network_sms = 16 if config.tensor_parallel_size > 1 else None
    return shared_sm_schedule(sms, network_sms=network_sms)


def _without_overlap(schedule: PipelineSchedule) -> PipelineSchedule:
    return PipelineSchedule(
        decode_shares=schedule.decode_shares, prefill_shares=schedule.prefill_shares
    )
