"""The FP8 experiment scripts run end to end on CPU: the accuracy script on the builtin model
and a tiny random Llama, the GPU benchmark's dry run (tiny shapes, references, no targets)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

EXPERIMENTS = Path(__file__).resolve().parent.parent / "experiments"


def _run(script: str, args: list[str], out: Path) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(EXPERIMENTS / script), *args, "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.mark.timeout(300)
@pytest.mark.parametrize("model", [["--model", "builtin"], ["--random-llama", "0.02"]])
def test_fp8_accuracy_script_measures_both_models(tmp_path, model):
    args = [*model, "--stream-len", "64", "--prompts", "2", "--prompt-len", "8", "--steps", "4"]
    _run("fp8_accuracy.py", args, tmp_path)
    (path,) = (tmp_path / "cpu" / "fp8_accuracy").glob("*.json")
    record = json.loads(path.read_text())
    assert record["device"] == "cpu" and record["reference_dtype"] == "float32"
    assert 0.0 < record["logits_rel_err"] < 1.0
    assert 0.0 <= record["greedy_agreement"] <= 1.0
    assert record["perplexity_reference"] > 1.0 and record["perplexity_fp8"] > 1.0
    for key in ("versions", "command", "commit", "date"):
        assert key in record
