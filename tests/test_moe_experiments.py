"""The MoE benchmark's dry run on CPU (tiny shapes, a tiny random Mixtral, no targets) and its
target rows, named as the MoE issue names them, taken from the record alone."""

from __future__ import annotations

import json
import sys

import pytest
from test_fp8_experiments import EXPERIMENTS, _run


@pytest.mark.timeout(300)
def test_moe_bench_dry_run_checks_the_kernels_and_graphs_and_writes_no_targets(tmp_path):
    _run("moe_bench.py", ["--sections", "kernels,graphs"], tmp_path)
    record = json.loads((tmp_path / "cpu" / "moe" / "dry-run.json").read_text())
    assert record["dry_run"] and record["kernels"]["checks_ok"]
    for row in record["kernels"]["tokens"].values():
        assert set(row) == {"triton", "grouped", "fp8_grouped"}
        assert row["grouped"]["rel_err_vs_ref"] < 1e-4  # fp32 on CPU
    graphs = record["graphs"]
    assert graphs["checks_ok"] and graphs["identical"] == 16 and graphs["graph_steps"] > 0
    assert "throughput" not in record and not (tmp_path / "targets").exists()


def test_moe_targets_come_from_the_record_with_the_issue_names():
    sys.path.insert(0, str(EXPERIMENTS))
    import moe_bench

    record = {
        "kernels": {"tokens": {"2048": {"grouped": {"frac_of_dense_gemm": 0.7}}}},
        "throughput": {"bf16_fraction_of_optimal": 0.3, "runs": {"fp8": {"error": "boom"}}},
    }
    rows = {r["name"]: r for r in moe_bench.targets(record)}
    assert set(rows) == {"grouped_gemm_frac_of_dense_2048", "mixtral_bf16_fraction_of_optimal"}
    assert rows["grouped_gemm_frac_of_dense_2048"]["measured"] == 0.7
    assert rows["mixtral_bf16_fraction_of_optimal"] == {
        "name": "mixtral_bf16_fraction_of_optimal", "measured": 0.3, "target": 0.35,
        "direction": "higher",
    }  # fmt: skip


def test_targets_files_carry_the_runs_provenance_beside_its_rows(tmp_path, capsys):
    sys.path.insert(0, str(EXPERIMENTS))
    from common import write_targets

    record = {"gpu": "NVIDIA H200", "device": "NVIDIA H200", "command": "python x.py",
              "commit": "abc1234", "date": "2026-12-02T00:00:00+00:00", "other": 1}  # fmt: skip
    rows = [{"name": "t", "measured": 0.5, "target": 0.6, "direction": "higher"}]
    path = write_targets(tmp_path, "moe", record, rows)
    written = json.loads(path.read_text())
    assert path == tmp_path / "targets" / "moe.json"
    assert written["targets"] == rows and written["commit"] == "abc1234"
    assert "other" not in written and "0.500 (target 0.6)" in capsys.readouterr().out
