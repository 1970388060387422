"""The FP8 experiment scripts run end to end on CPU: the accuracy script on a small random
Llama (the benchmark's dry run runs it on the builtin model), the GPU benchmark's dry run (tiny
shapes, references, no targets)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

EXPERIMENTS = Path(__file__).resolve().parent.parent / "experiments"


def _run(script: str, args: list[str], out: Path) -> subprocess.CompletedProcess:
    """Run ``script`` on CPU (GPUs hidden) with its results under ``out``."""
    cmd = [sys.executable, str(EXPERIMENTS / script), *args, "--out", str(out)]
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=out, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.mark.timeout(300)
def test_fp8_accuracy_script_measures_a_random_llama(tmp_path):
    args = ["--random-llama", "0.02", "--stream-len", "64", "--prompts", "2", "--prompt-len", "8",
            "--steps", "4"]  # fmt: skip
    _run("fp8_accuracy.py", args, tmp_path)
    (path,) = (tmp_path / "cpu" / "fp8_accuracy").glob("*.json")
    record = json.loads(path.read_text())
    assert record["device"] == "cpu" and record["reference_dtype"] == "float32"
    assert 0.0 < record["logits_rel_err"] < 1.0
    assert 0.0 <= record["greedy_agreement"] <= 1.0
    assert record["perplexity_reference"] > 1.0 and record["perplexity_fp8"] > 1.0
    for key in ("versions", "command", "commit", "date"):
        assert key in record


@pytest.mark.timeout(300)
def test_fp8_bench_dry_run_checks_every_section_and_writes_no_targets(tmp_path):
    _run("fp8_bench.py", [], tmp_path)
    record = json.loads((tmp_path / "cpu" / "fp8" / "dry-run.json").read_text())
    assert record["dry_run"] and record["device"] == "cpu"
    gemm = record["gemm"]
    assert set(gemm["shapes"]) == {"qkv", "o", "gate_up", "down"} and gemm["checks_ok"]
    assert all(r["rel_err_vs_bf16"] < 0.1 for r in gemm["shapes"].values())
    kernels = record["kernels"]["kernels"]
    assert set(kernels) == {"rms_norm_quant", "silu_and_mul_quant", "quantize_fp8"}
    assert all(k["ok"] for k in kernels.values())
    assert 0.0 < record["accuracy"]["builtin"]["logits_rel_err"] < 1.0
    runs = record["throughput"]["runs"]
    assert runs["bf16"]["tokens_per_s"] > 0 and runs["fp8"]["tokens_per_s"] > 0
    assert "--quantization fp8" in runs["fp8"]["command"]
    assert "other_workloads" not in record["throughput"]
    assert not (tmp_path / "targets").exists()


def test_fp8_bench_targets_come_from_the_record_with_the_issue_names():
    sys.path.insert(0, str(EXPERIMENTS))
    import fp8_bench

    record = {
        "gemm": {"tokens": 2048, "layer_gemm_speedup": 1.7, "layer_linear_speedup": 1.4},
        "throughput": {"runs": {"fp8": {"tokens_per_s": 45000.0}}, "fp8_over_bf16": 1.5},
        "accuracy": {"builtin": {"logits_rel_err": 0.2}},
    }
    rows = {r["name"]: r for r in fp8_bench.targets(record)}
    assert list(rows) == [
        "fp8_gemm_speedup_2048",
        "fp8_linear_speedup_2048",
        "fp8_weights_tokens_per_s",
        "fp8_over_bf16_weights_throughput",
        "fp8_logits_rel_err",
    ]
    assert rows["fp8_logits_rel_err"] == {
        "name": "fp8_logits_rel_err", "measured": 0.2, "target": 0.10, "direction": "lower"
    }  # fmt: skip
    assert rows["fp8_weights_tokens_per_s"]["target"] == 44000.0
    assert fp8_bench.targets({}) == []  # nothing measured, nothing claimed
    record["gemm"]["tokens"] = 1024
    assert "fp8_gemm_speedup_2048" not in {r["name"] for r in fp8_bench.targets(record)}
    failed = {"throughput": {"error": "CalledProcessError(...)", "checks_ok": False}}
    assert fp8_bench.targets(failed) == []
