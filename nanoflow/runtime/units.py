"""Execution units: a CUDA stream plus an SM budget, enforced by one of two mechanisms.

* CTA limit: plain streams; SM-budgeted Triton kernels launch at most ``num_sms`` programs and
  cuBLASLt GEMMs get an SM carve-out.
* Green contexts: one driver-level split of the device's SMs into disjoint partitions, each with a
  stream that torch uses through ``ExternalStream``.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from nanoflow.runtime.schedule import Mechanism, PipelineSchedule, UnitSpec

logger = logging.getLogger(__name__)

GREEN_CONTEXT_GRANULARITY = 8  # Hopper splits SMs in groups of 8


@dataclass
class ExecutionUnit:
    spec: UnitSpec
    stream: Any  # torch.cuda.Stream | None (None: run inline on the current stream)
    sm_carveout: int = 0
    handle: Any = None  # keeps a green context alive as long as its stream

    @property
    def num_sms(self) -> int | None:
        return self.spec.num_sms

    @property
    def cta_budget(self) -> int | None:
        """The CTA limit kernels get. A green context confines kernels to its SMs in hardware,
        so they launch a full grid there (several CTAs per SM keep more bytes in flight than
        one persistent CTA per SM); plain streams rely on the CTA limit itself."""
        return None if self.handle is not None else self.spec.num_sms

    @contextlib.contextmanager
    def active(self) -> Iterator[None]:
        """Make this unit's stream current and its cuBLASLt carve-out effective."""
        if self.stream is None:
            yield
            return
        with torch.cuda.stream(self.stream):
            torch._C._set_sm_carveout_experimental(self.sm_carveout or None)
            try:
                yield
            finally:
                torch._C._set_sm_carveout_experimental(None)


def device_sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def build_units(schedule: PipelineSchedule, device: torch.device) -> dict[str, ExecutionUnit]:
    """Streams (and green contexts) for a schedule's units; inline units on CPU."""
    if device.type != "cuda":
        return {u.name: ExecutionUnit(u, None) for u in schedule.units}
    if schedule.mechanism is Mechanism.GREEN_CONTEXT:
        return _green_context_units(schedule.units, device)
    total = device_sm_count(device)
    units = {}
    for u in schedule.units:
        carveout = 0 if u.num_sms is None else max(0, total - u.num_sms)
        stream = torch.cuda.Stream(device, priority=u.priority)
        units[u.name] = ExecutionUnit(u, stream, carveout)
    return units


def _check(result: Any) -> Any:
    from cuda.bindings import driver

    err, *rest = result if isinstance(result, tuple) else (result,)
    if err != driver.CUresult.CUDA_SUCCESS:
        raise RuntimeError(f"CUDA driver call failed: {err}")
    return rest[0] if len(rest) == 1 else rest


def _green_context_units(
    specs: tuple[UnitSpec, ...], device: torch.device
) -> dict[str, ExecutionUnit]:
    """Split the SMs once into groups of 8 and give each unit a disjoint run of groups; the
    last unit also takes the SMs the split leaves over."""
    from cuda.bindings import driver

    torch.cuda.init()
    dev = _check(driver.cuDeviceGet(device.index or 0))
    sm_resource = _check(
        driver.cuDeviceGetDevResource(dev, driver.CUdevResourceType.CU_DEV_RESOURCE_TYPE_SM)
    )
    total = sm_resource.sm.smCount
    max_groups = total // GREEN_CONTEXT_GRANULARITY
    groups, count, remaining = _check(
        driver.cuDevSmResourceSplitByCount(max_groups, sm_resource, 0, GREEN_CONTEXT_GRANULARITY)
    )
    groups = list(groups[:count])
    if len(groups) < len(specs):
        raise RuntimeError(f"the SMs split into {len(groups)} groups, fewer than the units")
    units: dict[str, ExecutionUnit] = {}
    for i, spec in enumerate(specs):
        if i == len(specs) - 1:  # the last unit takes what is left
            parts = groups + ([remaining] if remaining.sm.smCount else [])
        else:
            target = spec.num_sms or total
            parts = [groups.pop(0)]
            while len(groups) > len(specs) - i - 1 and (
                sum(p.sm.smCount for p in parts) + groups[0].sm.smCount <= target
            ):
                parts.append(groups.pop(0))
        num_sms = sum(p.sm.smCount for p in parts)
        workqueue = _balanced_workqueue(dev)
        try:
            with_wq = parts + [workqueue] if workqueue is not None else parts
            desc = _check(driver.cuDevResourceGenerateDesc(with_wq, len(with_wq)))
        except RuntimeError:
            workqueue = None
            desc = _check(driver.cuDevResourceGenerateDesc(parts, len(parts)))
        green = _check(
            driver.cuGreenCtxCreate(
                desc, dev, driver.CUgreenCtxCreate_flags.CU_GREEN_CTX_DEFAULT_STREAM
            )
        )
        raw = _check(
            driver.cuGreenCtxStreamCreate(
                green, driver.CUstream_flags.CU_STREAM_NON_BLOCKING, spec.priority
            )
        )
        stream = torch.cuda.ExternalStream(int(raw), device=device)
        unit_spec = UnitSpec(spec.name, num_sms, spec.priority)
        # cuBLASLt sizes its persistent grids from the device's SM count, which a green
        # context does not change: the carve-out makes one wave fit the partition
        carveout = total - num_sms
        units[spec.name] = ExecutionUnit(unit_spec, stream, carveout, (green, raw))
        logger.info(
            "green context %s: %d SMs, own workqueue: %s", spec.name, num_sms, workqueue is not None
        )
    return units


def _balanced_workqueue(dev: Any) -> Any:
    """A workqueue configuration that keeps this green context's stream-ordered work off the
    other contexts' hardware queues (CUDA 13.1+ drivers); None where the driver lacks it."""
    from cuda.bindings import driver

    kind = getattr(driver.CUdevResourceType, "CU_DEV_RESOURCE_TYPE_WORKQUEUE_CONFIG", None)
    scopes = getattr(driver, "CUdevWorkqueueConfigScope", None)
    if kind is None or scopes is None:
        return None
    err, resource = driver.cuDeviceGetDevResource(dev, kind)
    if err != driver.CUresult.CUDA_SUCCESS:
        return None
    resource.wqConfig.sharingScope = scopes.CU_WORKQUEUE_SCOPE_GREEN_CTX_BALANCED
    return resource
