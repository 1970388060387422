"""Workloads: dataset shapes match their published statistics, seeds reproduce, traces parse and
bad traces fail with a ConfigError, Poisson arrivals have the asked rate."""

from __future__ import annotations

import json
import math
import statistics

import pytest

from nanoflow.errors import ConfigError
from nanoflow.workloads import (
    DATASETS,
    MAX_INPUT_LEN,
    MAX_OUTPUT_LEN,
    WorkloadRequest,
    from_trace,
    load_workload,
    with_poisson_arrivals,
)


@pytest.mark.parametrize("name", sorted(DATASETS))
def test_dataset_means_match_published(name):
    requests = load_workload(name, 8000, seed=1)
    shape = DATASETS[name]
    mean_in = statistics.fmean(r.input_len for r in requests)
    mean_out = statistics.fmean(r.output_len for r in requests)
    assert mean_in == pytest.approx(shape.input.mean, rel=0.08)
    assert mean_out == pytest.approx(shape.output.mean, rel=0.08)
    assert all(1 <= r.input_len <= MAX_INPUT_LEN for r in requests)
    assert all(1 <= r.output_len <= MAX_OUTPUT_LEN for r in requests)


def test_dataset_seeding_is_reproducible():
    assert load_workload("sharegpt", 50, seed=3) == load_workload("ShareGPT", 50, seed=3)
    assert load_workload("sharegpt", 50, seed=3) != load_workload("sharegpt", 50, seed=4)
    assert load_workload("lmsys", 50, seed=3) != load_workload("sharegpt", 50, seed=3)


def test_constant_workload():
    assert load_workload("512/1024", 3) == [WorkloadRequest(512, 1024)] * 3


def test_unknown_workload():
    with pytest.raises(ConfigError, match="unknown workload"):
        load_workload("alpaca", 3)


def test_trace_csv_and_json(tmp_path):
    csv_path = tmp_path / "t.csv"
    csv_path.write_text("input_len,output_len,arrival_time\n10,5,0.5\n20,7,\n")
    assert from_trace(csv_path) == [WorkloadRequest(10, 5, 0.5), WorkloadRequest(20, 7)]
    json_path = tmp_path / "t.json"
    json_path.write_text(json.dumps([{"input_len": 3, "output_len": 4}] * 5))
    assert load_workload(str(json_path), 2) == [WorkloadRequest(3, 4)] * 2


@pytest.mark.parametrize(
    "name, text",
    [
        ("missing.csv", "input_len\n10\n"),
        ("word.csv", "input_len,output_len\nten,5\n"),
        ("zero.csv", "input_len,output_len\n0,5\n"),
        ("broken.json", "[{"),
        ("scalars.json", "[1, 2]"),
    ],
)
def test_bad_trace_is_a_config_error(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(ConfigError, match="trace"):
        from_trace(path)


def test_poisson_arrivals():
    requests = load_workload("512/512", 4000)
    timed = with_poisson_arrivals(requests, rate=8.0, seed=0)
    times = [r.arrival_time for r in timed]
    assert times[0] == 0.0 and times == sorted(times)
    assert times[-1] / (len(times) - 1) == pytest.approx(1 / 8, rel=0.05)
    assert [(r.input_len, r.output_len) for r in timed] == [(512, 512)] * 4000
    assert with_poisson_arrivals(requests, 8.0, seed=0) == timed
    assert {r.arrival_time for r in with_poisson_arrivals(requests[:5], math.inf)} == {0.0}
    with pytest.raises(ConfigError, match="rate"):
        with_poisson_arrivals(requests, 0.0)
