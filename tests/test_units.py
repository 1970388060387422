"""Execution units: on CPU every unit runs inline on the current stream with no SM limit
enforced, and a unit's kernels are told the CTA budget only where no green context confines
them; on a GPU, the streams and the green-context split itself."""

from __future__ import annotations

import pytest
import torch

from nanoflow.runtime.schedule import (
    Mechanism,
    PipelineSchedule,
    UnitSpec,
    sequential_schedule,
    shared_sm_schedule,
)
from nanoflow.runtime.units import GREEN_CONTEXT_GRANULARITY, ExecutionUnit, build_units

CPU = torch.device("cpu")


def two_units(mechanism: Mechanism) -> PipelineSchedule:
    return PipelineSchedule(
        decode_shares=(0.5, 0.5),
        prefill_shares=(0.5, 0.5),
        units=(UnitSpec("compute", 100), UnitSpec("memory", 32, priority=-1)),
        op_units={"compute": "compute", "memory": "memory", "network": "compute"},
        mechanism=mechanism,
        overlap=True,
    )


@pytest.mark.parametrize("mechanism", list(Mechanism))
def test_on_cpu_every_unit_runs_inline_with_its_spec(mechanism):
    schedule = two_units(mechanism)
    units = build_units(schedule, CPU)
    assert list(units) == ["compute", "memory"]
    for spec in schedule.units:
        unit = units[spec.name]
        assert unit.spec == spec and unit.stream is None and unit.sm_carveout == 0
        assert unit.num_sms == spec.num_sms and unit.cta_budget == spec.num_sms


def test_sequential_schedule_has_one_whole_gpu_unit():
    (unit,) = build_units(sequential_schedule(), CPU).values()
    assert unit.num_sms is None and unit.cta_budget is None


def test_a_shared_sm_schedule_limits_only_its_memory_unit():
    units = build_units(shared_sm_schedule(132, attention_fraction=0.25), CPU)
    assert units["compute"].cta_budget is None  # the GEMMs keep the whole GPU
    assert units["attention"].cta_budget == 33  # a quarter of the SMs' worth of CTAs beside them


def test_a_green_context_confines_kernels_so_they_get_no_cta_limit():
    """Kernels in a green context launch a full grid (the hardware keeps them on the
    partition); on a plain stream the CTA limit is all that keeps them off the other unit."""
    spec = UnitSpec("memory", 32)
    assert ExecutionUnit(spec, stream=None).cta_budget == 32
    assert ExecutionUnit(spec, stream=None, handle=("green", "stream")).cta_budget is None


def test_an_inline_unit_leaves_the_current_stream_and_carveout_alone():
    unit = ExecutionUnit(UnitSpec("memory", 32), stream=None, sm_carveout=100)
    x = torch.ones(4)
    with unit.active():
        y = x * 2  # runs where it is: no CUDA stream or carve-out is touched on CPU
    assert torch.equal(y, torch.full((4,), 2.0))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cta_limited_units_get_streams_and_a_carveout_of_the_other_sms():
    device = torch.device("cuda", 0)
    total = torch.cuda.get_device_properties(device).multi_processor_count
    units = build_units(two_units(Mechanism.CTA_LIMIT), device)
    assert units["compute"].sm_carveout == total - 100
    assert units["memory"].sm_carveout == total - 32
    assert units["compute"].stream is not units["memory"].stream


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_green_context_units_split_the_sms_once_into_disjoint_partitions():
    pytest.importorskip("cuda.bindings")
    device = torch.device("cuda", 0)
    total = torch.cuda.get_device_properties(device).multi_processor_count
    units = build_units(two_units(Mechanism.GREEN_CONTEXT), device)
    compute, memory = units["compute"].num_sms, units["memory"].num_sms
    assert compute % GREEN_CONTEXT_GRANULARITY == 0 and compute <= 100
    assert compute + memory <= total  # one split: the partitions do not overlap
    assert all(u.cta_budget is None for u in units.values())
