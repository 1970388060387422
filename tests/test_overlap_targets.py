"""The overlap benchmark's dry run on CPU (the builtin model, roofline bounds, tiny fixed
iterations, the offline pair and a timeline; no targets) and its target rows, named as the
overlap issue names them and taken from the record alone."""

from __future__ import annotations

import json
import sys

import pytest
from test_fp8_experiments import EXPERIMENTS, _run


@pytest.mark.timeout(300)
def test_overlap_dry_run_times_both_configurations_and_writes_no_targets(tmp_path):
    _run("overlap_targets.py", [], tmp_path)
    record = json.loads((tmp_path / "cpu" / "overlap" / "dry-run.json").read_text())
    assert record["dry_run"] and set(record["iterations"]) == {"bf16", "fp8"}
    for config in record["iterations"].values():
        for iteration in config["iterations"].values():
            rows = iteration["schedules"]
            assert all("gpu_ms" in row and "bound" in row for row in rows.values())
            assert iteration["best_overlapped"] and iteration["speedup"] > 0
    assert record["offline"]["16/8"]["tuned_over_sequential"] > 0
    assert record["timeline"]["schedule"] == record["iterations"][record["winner"]][
        "iterations"]["mixed"]["best_overlapped"]  # fmt: skip
    assert list((tmp_path / "cpu" / "timeline").glob("overlap-*.json"))
    assert not (tmp_path / "targets").exists()


def test_overlap_targets_take_each_configurations_worse_iteration():
    sys.path.insert(0, str(EXPERIMENTS))
    import overlap_targets

    def config(*speedups):
        return {"iterations": {f"i{n}": {"speedup": s, "best_measured_over_bound": 1 + n / 10}
                               for n, s in enumerate(speedups)}}  # fmt: skip

    record = {
        "iterations": {"bf16": config(1.2, 1.05), "fp8": config(1.3, None)},
        "winner": "bf16",
        "offline": {"512/1024": {"tuned_over_sequential": 1.07}, "sharegpt": {"runs": {}}},
    }
    rows = {r["name"]: r for r in overlap_targets.targets(record)}
    assert rows["fixed_iteration_speedup_bf16"]["measured"] == 1.05
    assert "fixed_iteration_speedup_fp8" not in rows  # one iteration did not run
    assert rows["measured_over_bound"] == {"name": "measured_over_bound", "measured": 1.1,
                                           "target": 1.10, "direction": "lower"}  # fmt: skip
    assert rows["offline_tuned_over_sequential_512_1024"]["measured"] == 1.07
    assert "offline_tuned_over_sequential_dataset" not in rows
