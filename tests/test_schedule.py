"""Pipeline schedules: validation, JSON round trip, nano-batch splitting, timeline drawing."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from nanoflow.errors import ScheduleError
from nanoflow.runtime.graph import Resource
from nanoflow.runtime.schedule import (
    LaunchOrder,
    Mechanism,
    PipelineSchedule,
    UnitSpec,
    default_overlapped_schedule,
    split_counts,
)
from nanoflow.runtime.timeline import TimelineRecord, draw_timeline, save_timeline


@given(
    total=st.integers(0, 5000),
    weights=st.lists(st.floats(0.0, 1.0), min_size=1, max_size=6).filter(lambda w: sum(w) > 0),
)
def test_split_counts_is_exact_and_proportional(total, weights):
    shares = tuple(w / sum(weights) for w in weights)
    counts = split_counts(total, shares)
    assert sum(counts) == total
    for count, share in zip(counts, shares, strict=True):
        assert abs(count - total * share) < 1.0 + 1e-9


def test_round_trip():
    schedule = PipelineSchedule(
        decode_shares=(0.25, 0.75),
        prefill_shares=(0.5, 0.5),
        units=(UnitSpec("a", 96), UnitSpec("b", 36, priority=-1)),
        op_units={"compute": "a", "memory": "b", "network": "b", "qkv_proj": "b"},
        launch_order=LaunchOrder.WAVEFRONT,
        mechanism=Mechanism.GREEN_CONTEXT,
        overlap=True,
    )
    assert PipelineSchedule.from_dict(schedule.to_dict()) == schedule
    assert schedule.unit_of("qkv_proj", Resource.COMPUTE).name == "b"
    assert schedule.unit_of("o_proj", Resource.COMPUTE).name == "a"


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"decode_shares": (0.5, 0.5), "prefill_shares": (1.0,)}, "one entry per nano-batch"),
        ({"decode_shares": (0.7, 0.7), "prefill_shares": (0.5, 0.5)}, "sum to 1"),
        ({"units": (UnitSpec("x"), UnitSpec("x"))}, "unique"),
        ({"op_units": {"compute": "nowhere", "memory": "main", "network": "main"}}, "unknown"),
        ({"op_units": {"compute": "main", "memory": "main"}}, "network"),
        ({"units": (UnitSpec("main", 0),)}, "SM budget"),
    ],
)
def test_invalid_schedules_say_why(kwargs, message):
    with pytest.raises(ScheduleError, match=message):
        PipelineSchedule(**kwargs)


def test_malformed_dict():
    with pytest.raises(ScheduleError, match="malformed"):
        PipelineSchedule.from_dict({"decode_shares": [1.0]})
    data = default_overlapped_schedule(132).to_dict()
    data["mechanism"] = "magic"
    with pytest.raises(ScheduleError, match="malformed"):
        PipelineSchedule.from_dict(data)


def test_timeline_png(tmp_path):
    records = [
        TimelineRecord(0, "qkv_proj", "compute", 0, "compute", 0.0, 1.0),
        TimelineRecord(0, "decode_attention", "memory", 0, "memory", 1.0, 2.0),
        TimelineRecord(0, "qkv_proj", "compute", 1, "compute", 1.0, 2.0),
    ]
    path = tmp_path / "t.png"
    draw_timeline(records, path, "test")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    save_timeline(records, tmp_path / "t.json", {"device": "cpu", "command": "x"})
    data = json.loads((tmp_path / "t.json").read_text())
    assert data["command"] == "x" and data["experiment"] == "timeline"
    assert data["records"][1]["op"] == "decode_attention" and data["records"][1]["end_ms"] == 2.0
