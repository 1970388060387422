"""Which pipeline schedule and token budget an engine runs with: a tuning profile when given,
else the executor the user asked for, else the hand-written default for the device."""

from __future__ import annotations

import torch

from nanoflow.config import EngineConfig
from nanoflow.models.spec import ModelSpec
from nanoflow.pipeline.schedule import (
    PipelineSchedule,
    default_overlapped_schedule,
    nano_batch_schedule,
    sequential_schedule,
)
from nanoflow.pipeline.units import device_sm_count

DEFAULT_TOKEN_BUDGET = 2048


def select_schedule(
    config: EngineConfig, spec: ModelSpec, device: torch.device
) -> tuple[PipelineSchedule, int, str]:
    """(schedule, per-iteration token budget, a line saying where they came from)."""
    budget = config.max_num_batched_tokens or DEFAULT_TOKEN_BUDGET
    executor = config.executor
    if config.profile is not None:
        from nanoflow.autotune.profile import load_profile

        profile = load_profile(config.profile, spec, device)
        budget = config.max_num_batched_tokens or profile.dense_batch_size
        schedule = profile.schedule
        if executor == "sequential":
            return sequential_schedule(), budget, "sequential executor (profile's budget)"
        if executor == "nanobatch":
            return _without_overlap(schedule), budget, f"profile {config.profile}, no overlap"
        return schedule, budget, f"profile {config.profile}"
    if executor == "auto":
        executor = "overlapped" if device.type == "cuda" else "sequential"
    if executor == "sequential":
        return sequential_schedule(), budget, "sequential executor (no profile)"
    if executor == "nanobatch":
        return nano_batch_schedule(2), budget, "2 nano-batches without overlap (no profile)"
    sms = device_sm_count(device) if device.type == "cuda" else 132
    return (
        default_overlapped_schedule(sms),
        budget,
        "default overlapped schedule (no profile given; run `nanoflow tune` for a tuned one)",
    )


def _without_overlap(schedule: PipelineSchedule) -> PipelineSchedule:
    return PipelineSchedule(
        decode_shares=schedule.decode_shares, prefill_shares=schedule.prefill_shares
    )
