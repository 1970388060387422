"""The pipeline schedules the GPU benchmarks time by name: the sequential and nano-batch
baselines, overlapped layouts over CTA limits and green contexts, the hand-written schedule,
and launch-order variants of each."""

from __future__ import annotations

import dataclasses

import torch

from nanoflow.config import EngineConfig
from nanoflow.engine.schedule_select import architecture_schedule
from nanoflow.runtime.graph import DECODE_ATTENTION
from nanoflow.runtime.schedule import (
    LaunchOrder,
    Mechanism,
    PipelineSchedule,
    UnitSpec,
    nano_batch_schedule,
    sequential_schedule,
    shared_sm_schedule,
)
from nanoflow.runtime.units import device_sm_count


def overlapped(
    compute: int | None,
    memory: int,
    mechanism: Mechanism,
    nano: int = 2,
    priority: int = 0,
    attention_only: bool = False,
) -> PipelineSchedule:
    """Two units; ``compute=None`` leaves GEMMs the whole GPU, the memory unit's kernels then
    share SMs with them under a CTA limit (and ``priority`` for its stream). ``attention_only``
    puts only decode attention on the memory unit (norms, RoPE and SiLU stay with the GEMMs)."""
    shares = tuple([1.0 / nano] * nano)
    op_units = {"compute": "compute", "memory": "memory", "network": "compute"}
    if attention_only:
        op_units |= {"memory": "compute", DECODE_ATTENTION: "memory"}
    return PipelineSchedule(
        decode_shares=shares,
        prefill_shares=shares,
        units=(UnitSpec("compute", compute), UnitSpec("memory", memory, priority)),
        op_units=op_units,
        mechanism=mechanism,
        overlap=True,
    )


def candidate_schedules(config: EngineConfig, device: torch.device) -> dict[str, PipelineSchedule]:
    """Every named schedule (green-context ones only where a GPU can build them)."""
    schedules: dict[str, PipelineSchedule] = {
        "sequential": sequential_schedule(),
        "nanobatch-2": nano_batch_schedule(2),
        "overlap-green-88/44": overlapped(88, 44, Mechanism.GREEN_CONTEXT),
        "overlap-shared-all/32-high": overlapped(None, 32, Mechanism.CTA_LIMIT, priority=-1),
        "overlap-shared-all/66-high": overlapped(None, 66, Mechanism.CTA_LIMIT, priority=-1),
    }
    for memory in (32, 66, 100):
        schedules[f"overlap-attn-all/{memory}-high"] = overlapped(
            None, memory, Mechanism.CTA_LIMIT, priority=-1, attention_only=True
        )
    for compute, memory in ((100, 32), (88, 44)):  # GEMMs confined too: hardware, or cuBLASLt
        schedules[f"overlap-attn-green-{compute}/{memory}"] = overlapped(
            compute, memory, Mechanism.GREEN_CONTEXT, attention_only=True
        )
        schedules[f"overlap-attn-cta-{compute}/{memory}"] = overlapped(
            compute, memory, Mechanism.CTA_LIMIT, attention_only=True
        )
    hand_written = architecture_schedule(config, device)
    schedules["hand-written"] = hand_written
    schedules["hand-written-4-nano-batches"] = shared_sm_schedule(
        device_sm_count(device) if device.type == "cuda" else 132, num_nano_batches=4
    )
    # the same with each nano-batch's ops launched a step behind the previous one's: the streams
    # then interleave the nano-batches instead of running them in lock step
    schedules["hand-written-wavefront"] = dataclasses.replace(
        hand_written, launch_order=LaunchOrder.WAVEFRONT
    )
    schedules["overlap-green-88/44-wavefront"] = dataclasses.replace(
        schedules["overlap-green-88/44"], launch_order=LaunchOrder.WAVEFRONT
    )
    for compute, memory in ((96, 36), (104, 28), (112, 20)):  # where the two units balance
        schedules[f"overlap-attn-green-{compute}/{memory}"] = overlapped(
            compute, memory, Mechanism.GREEN_CONTEXT, attention_only=True
        )
    schedules["overlap-attn-green-100/32-4nb"] = overlapped(
        100, 32, Mechanism.GREEN_CONTEXT, nano=4, attention_only=True
    )
    # each nano-batch's stretch between two decode attentions queued whole: one nano-batch's
    # GEMMs run while another's attention does
    for name in [n for n, s in schedules.items() if s.overlap and "wavefront" not in n]:
        schedules[f"{name}-alternating"] = dataclasses.replace(
            schedules[name], launch_order=LaunchOrder.ALTERNATING
        )
    if device.type != "cuda":  # green contexts need a GPU; the rest runs as a dry run
        schedules = {k: v for k, v in schedules.items() if "green" not in k}
    return schedules
