"""The GPU experiment scripts run end to end on CPU with tiny models, so a GPU run of them
fails only for GPU reasons."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

EXPERIMENTS = Path(__file__).resolve().parent.parent / "experiments"
SCHEDULES = ("sequential", "nanobatch-2", "overlap-attn-all/66-high", "hand-written-wavefront")


def _run(script: str, args: list[str], out: Path, where: str | None = None) -> dict:
    """Run ``script`` with ``--out out``; its one result file (in ``out/where`` if given)."""
    cmd = [sys.executable, str(EXPERIMENTS / script), *args, "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=400, cwd=out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    folder = out / where if where else out
    found = sorted(folder.glob("*.json"))
    assert len(found) == 1, sorted(out.rglob("*.json"))
    return json.loads(found[0].read_text())


@pytest.mark.timeout(420)
def test_pipeline_bench_dry_run(tmp_path):
    record = _run(
        "pipeline_bench.py",
        [
            "--device",
            "cpu",
            "--model",
            "builtin",
            "--num-prompts",
            "4",
            "--budget",
            "64",
            "--context",
            "48",
            "--input-len",
            "24",
            "--output-len",
            "6",
            "--schedules",
            ",".join(SCHEDULES),
        ],
        tmp_path,
        "cpu/pipeline",
    )
    assert record["parity"]["greedy_identical_vs_hf_fp32"] == record["parity"]["prompts"]
    assert record["parity"]["max_logits_rel_err_vs_fp32"] < 1e-4
    rows = record["e2e"]["schedules"]
    assert set(rows) == set(SCHEDULES)
    for row in rows.values():
        assert "error" not in row
        assert row["greedy_16_identical_to_sequential"] == 1.0
    for key in ("date", "torch", "command", "device"):
        assert record[key]


@pytest.mark.timeout(300)
def test_tp_bench_dry_run(tmp_path, llama_checkpoint):
    record = _run(
        "tp_bench.py",
        [
            "--device",
            "cpu",
            "--model",
            str(llama_checkpoint[0]),
            "--tp",
            "2",
            "--num-prompts",
            "3",
            "--workload",
            "12/4",
        ],
        tmp_path,
        "cpu/tp",
    )
    assert {r["executor"] for r in record["results"]} == {"sequential", "overlapped"}
    assert "error" not in record


@pytest.mark.timeout(300)
@pytest.mark.parametrize("mode", ["moe", "offload"])
def test_moe_offload_bench_dry_run(tmp_path, mode):
    args = ["--device", "cpu", "--model", "tiny", "--num-prompts", "3", "--input-len", "16",
            "--output-len", "4", "--budget", "64"]  # fmt: skip
    record = _run("moe_offload_bench.py", args + (["--offload"] if mode == "offload" else []),
                  tmp_path, f"cpu/{mode}")  # fmt: skip
    for key in ("date", "torch", "command", "device"):
        assert record[key]
    if mode == "moe":
        assert max(row["rel_err_vs_ref"] for row in record["kernel"]) < 1e-5
        for row in record["schedules"].values():
            assert "error" not in row and row["greedy_16_identical_to_sequential"] == 1.0
    else:
        assert record["parity"]["greedy_identical"] == record["parity"]["prompts"]
        assert record["offloaded_layers"] and record["h2d_gbs"] > 0


@pytest.mark.timeout(300)
def test_bench_kernels_dry_run(tmp_path):
    """On CPU the kernel benchmark checks every kernel (interpreter, tiny shapes, fp32)."""
    record = _run("bench_kernels.py", [], tmp_path, "cpu/kernels")
    assert record["checks"] and all(check["ok"] for check in record["checks"])
    assert not record["errors"]
    for key in ("date", "versions", "command", "device"):
        assert record[key]
    for kind in ("fp8", "tma"):
        rows = record[f"decode_attention_{kind}"]["rows"]
        assert {row["num_ctas"] for row in rows} >= {None}
        assert any(check["name"].startswith(f"decode {kind}") for check in record["checks"])
    assert any(row["tma"] for row in record["decode_attention_tma"]["rows"])


def test_bench_kernels_runs_the_chosen_sections_and_rejects_unknown_ones(tmp_path):
    # the refused run starts first and runs beside the chosen section's (nothing is shared)
    cmd = [sys.executable, str(EXPERIMENTS / "bench_kernels.py"), "--sections", "nope"]
    pipe = subprocess.PIPE
    refused = subprocess.Popen(cmd, stdout=pipe, stderr=pipe, text=True, cwd=tmp_path)
    try:
        record = _run(
            "bench_kernels.py", ["--sections", "check_pointwise"], tmp_path, "cpu/kernels"
        )
        assert "ceilings" in record["section_seconds"]
        assert set(record["section_seconds"]) == {"ceilings", "check_pointwise"}
        _, stderr = refused.communicate(timeout=120)
    finally:
        if refused.poll() is None:
            refused.kill()
            refused.communicate()
    assert refused.returncode == 2 and "unknown sections ['nope']" in stderr


@pytest.mark.timeout(200)
def test_host_overhead_times_every_phase_of_a_full_batch(tmp_path):
    """The host-only loop: every phase timed, the batch held at its sequence limit, and no
    collection at the engine's threshold."""
    args = ["--num-prompts", "60", "--max-num-seqs", "32", "--budget", "256"]
    args += ["--warmup-steps", "40", "--steps", "10"]
    record = _run("host_overhead.py", args, tmp_path, "cpu/host_overhead")
    result = record["result"]
    assert result["decodes_per_iteration"] > 16
    assert set(result["phase_ms_per_iteration"]) == {
        "plan", "prepare (layout + upload)", "sample", "resolve"}  # fmt: skip
    assert all(ms > 0 for ms in result["phase_ms_per_iteration"].values())
    assert result["gc_collections_by_generation"] == [0, 0, 0]
    assert record["experiment"] == "host_overhead" and "command" in record
    assert result["sampling"] == "greedy" and "structured" not in result


@pytest.mark.timeout(200)
def test_host_overhead_times_the_grammar_phases_of_a_structured_batch(tmp_path):
    args = ["--num-prompts", "32", "--max-num-seqs", "32", "--budget", "256", "--workload"]
    args += ["16/32", "--warmup-steps", "4", "--steps", "8", "--structured"]
    result = _run("host_overhead.py", args, tmp_path, "cpu/host_overhead")["result"]
    assert result["sampling"] == "structured" and result["decodes_per_iteration"] == 32
    grammar = result["structured"]
    assert grammar["mask_steps"] >= 8 and grammar["fill_ms_per_step"] > 0
    assert grammar["wait_ms_per_step"] > 0


@pytest.mark.timeout(300)
def test_jit_in_run_dry_run(tmp_path):
    """Two passes per executor, the first over an empty Triton cache, each with its compile log."""
    args = ["--device", "cpu", "--model", "builtin", "--num-prompts", "4", "--workload", "16/4"]
    cmd = [sys.executable, str(EXPERIMENTS / "jit_in_run.py"), *args, "--label", "dry"]
    proc = subprocess.run([*cmd, "--out", str(tmp_path)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    record = json.loads((tmp_path / "cpu" / "jit_in_run" / "builtin-16_4-dry.json").read_text())
    assert [r["triton_cache"] for r in record["runs"]] == ["empty cache", "warm cache"]
    for run in record["runs"]:
        assert run["tokens_per_s"] > 0 and run["iterations"] > 0
        assert run["triton_compiles"]["compilations"] == 0  # the CPU path runs no Triton kernel
    for key in ("date", "versions", "command", "device"):
        assert record[key]
