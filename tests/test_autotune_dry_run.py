"""`nanoflow tune` and the GPU tuning script run end to end on CPU (nominal roofline tables in
place of the GPU-only profiler), so a GPU run of them fails only for GPU reasons."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from nanoflow.autotune.tables import load_tables
from nanoflow.cli.main import main
from nanoflow.models.builtin import BUILTIN_SPEC
from nanoflow.runtime.profile import load_profile

SCRIPT = Path(__file__).resolve().parent.parent / "experiments" / "tune_llama3_8b.py"


def test_tune_cli_searches_on_cpu_and_writes_a_loadable_profile(tmp_path, capsys):
    out = tmp_path / "profiles" / "builtin" / "cpu.json"
    db = tmp_path / "study.db"
    argv = ["tune", "--model", "builtin", "--tables-in", "roofline", "--out", str(out),
            "--tables-out", str(tmp_path / "tables.json"), "--trials", "15", "--device", "cpu",
            "--max-batch", "256", "--storage", f"sqlite:///{db}"]  # fmt: skip
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "chosen: dense batch" in printed and "not validated" in printed
    import torch

    profile = load_profile(out, BUILTIN_SPEC.architecture_hash(), torch.device("cpu"))
    assert 64 <= profile.dense_batch_size <= 256 and profile.measured_iteration_s is None
    assert load_tables(tmp_path / "tables.json").architecture_hash == profile.architecture_hash
    assert db.is_file()
    rerun = argv[:3] + ["--tables-in", str(tmp_path / "tables.json")] + argv[5:]
    assert main(rerun) == 0


def test_tune_cli_without_tables_on_cpu_says_to_pass_them(tmp_path, capsys):
    assert (
        main(["tune", "--model", "builtin", "--device", "cpu", "--out", str(tmp_path / "p")]) == 2
    )
    assert "needs a GPU" in capsys.readouterr().err


@pytest.mark.timeout(300)
def test_tuning_script_dry_run(tmp_path):
    cmd = [sys.executable, str(SCRIPT), "--device", "cpu", "--model", "builtin", "--tables-in",
           "roofline", "--workload", "24/6", "--num-prompts", "4", "--trials", "12", "--top-k",
           "2", "--max-batch", "128", "--out", str(tmp_path), "--profile-out",
           str(tmp_path / "profile.json")]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=280, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    record = json.loads((tmp_path / "cpu" / "tune" / "builtin.json").read_text())
    tuning = record["tuning"]
    assert tuning["tuning_seconds"] > 0 and tuning["measured_iteration_s"] > 0
    assert len(tuning["candidates"]) == 2
    assert set(record["throughput"]) == {"sequential", "default_overlapped", "tuned_profile"}
    for key in ("date", "torch", "command", "device"):
        assert record[key]


def test_tune_cli_tunes_for_an_fp8_cache_and_refuses_tables_of_another(tmp_path, capsys):
    import torch

    out, tables = tmp_path / "fp8.json", tmp_path / "tables.json"
    argv = ["tune", "--model", "builtin", "--out", str(out), "--trials", "5", "--device", "cpu",
            "--max-batch", "128", "--kv-cache-dtype", "fp8"]  # fmt: skip
    assert main([*argv, "--tables-in", "roofline", "--tables-out", str(tables)]) == 0
    assert (
        load_profile(out, BUILTIN_SPEC.architecture_hash(), torch.device("cpu")).kv_cache_dtype
        == "fp8"
    )
    assert load_tables(tables).kv_element_bytes == 1
    assert main([*argv[:-1], "auto", "--tables-in", str(tables)]) == 2
    assert "measured with a 1-byte KV cache, not the 'auto' cache" in capsys.readouterr().err
