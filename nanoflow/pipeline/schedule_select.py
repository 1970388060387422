"""Which pipeline schedule and token budget an engine runs with: a tuning profile when given,
else the executor the user asked for, else the hand-written default for the device."""

from __future__ import annotations

import importlib.util

import torch

from nanoflow.config import EngineConfig
from nanoflow.models.spec import ModelSpec
from nanoflow.pipeline.schedule import (
    Mechanism,
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
    if executor in ("auto", "sequential"):
        return (
            sequential_schedule(),
            budget,
            "sequential executor (no profile given; `nanoflow tune` makes one that overlaps "
            "where that measures faster, or pass --executor overlapped)",
        )
    if executor == "nanobatch":
        return nano_batch_schedule(2), budget, "2 nano-batches without overlap (no profile)"
    return architecture_schedule(config, spec, device), budget, "hand-written overlapped schedule"


def architecture_schedule(
    config: EngineConfig, spec: ModelSpec, device: torch.device
) -> PipelineSchedule:
    """The overlapped schedule used without a profile, per architecture and machine.

    Decode attention reads every cached K/V once per step, so its share of the GPU grows with the
    KV bytes per token: models with grouped-query attention (4+ query heads per KV head) give the
    memory unit a third of the SMs, multi-head models half. Green contexts are the mechanism where
    the driver offers them (on an H100 they let decode attention on 44 SMs overlap a GEMM; with
    one persistent CTA per SM it does not reach the bandwidth); tensor parallelism adds a small
    network unit for the collectives, on plain streams.
    """
    sms = device_sm_count(device) if device.type == "cuda" else 132
    group = spec.num_heads // spec.num_kv_heads
    tensor_parallel = config.tensor_parallel_size > 1
    mechanism = Mechanism.CTA_LIMIT
    if device.type == "cuda" and not tensor_parallel and _has_driver_bindings():
        mechanism = Mechanism.GREEN_CONTEXT
    return default_overlapped_schedule(
        sms,
        memory_fraction=1 / 3 if group >= 4 else 1 / 2,
        mechanism=mechanism,
        network_sms=16 if tensor_parallel else None,
    )


def _without_overlap(schedule: PipelineSchedule) -> PipelineSchedule:
    return PipelineSchedule(
        decode_shares=schedule.decode_shares, prefill_shares=schedule.prefill_shares
    )


def _has_driver_bindings() -> bool:
    try:
        return importlib.util.find_spec("cuda.bindings") is not None
    except ModuleNotFoundError:  # no ``cuda`` package at all
        return False
