"""The experiment scripts on CPU: results are filed by GPU and experiment and carry what makes
them quotable, the tables and figures come from result files only (the committed ones regenerate
as committed), and every figure's reproduce entry and the transformers peer dry-run."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest

EXPERIMENTS = Path(__file__).resolve().parent.parent / "experiments"
sys.path.insert(0, str(EXPERIMENTS))

import common  # noqa: E402
import online_latency  # noqa: E402
import plots  # noqa: E402
import report  # noqa: E402
import reproduce  # noqa: E402
import schedule_replay  # noqa: E402

ENV = {"device": "cuda:0", "gpu": "NVIDIA H100 80GB HBM3", "date": "2026-11-23T10:00:00+00:00"}


def synthetic_results(folder: Path) -> None:
    for executor, tps in (("sequential", 8000.0), ("nanobatch", 7600.0), ("overlapped", 9900.0)):
        record = ENV | {
            "experiment": "throughput",
            "model": "llama-3-8b",
            "executor": executor,
            "result": {
                "workload": "512/512",
                "num_prompts": 400,
                "tokens_per_s": tps,
                "fraction_of_optimal": 0.4,
                "fraction_of_roofline": 0.75,
            },
        }
        common.write_result(folder, "throughput", executor, record, "nanoflow bench ...")
    peer = ENV | {
        "experiment": "peer_transformers",
        "model": "llama-3-8b",
        "workload": "512/512",
        "result": {
            "static": {"batch_size": 128, "tokens_per_s": 3000.0},
            "continuous": {"error": "boom"},
        },
    }
    common.write_result(folder, "peer_transformers", "llama-3-8b", peer, "python peer")
    points = [
        {"request_rate": r, "normalized_latency_s": 0.05 * r, "ttft_p99_s": 0.1 * r}
        for r in (1, 2, 4, 8)
    ]
    points[2] |= {"completed": 40, "failed": 0, "output_tokens_per_s": 1234.5}
    latency = ENV | {
        "experiment": "online_latency",
        "model": "llama-3-8b",
        "workload": "sharegpt",
        "result": {"slo_s_per_token": 0.2, "points": points, "max_rate_under_slo": 4},
    }
    common.write_result(folder, "online_latency", "llama-3-8b-sharegpt", latency, "python online")
    unsourced = folder / "nvidia-h100-80gb-hbm3" / "throughput" / "unsourced.json"
    unsourced.write_text(json.dumps({"result": {"tokens_per_s": 1e9}}))


def test_write_result_files_a_result_by_gpu_and_experiment_and_stamps_it(tmp_path, monkeypatch):
    monkeypatch.setenv(common.COMMIT_ENV, "abc123")
    path = common.write_result(tmp_path, "kernels", "all", {"gpu": "NVIDIA H200"}, "cmd")
    assert path == tmp_path / "nvidia-h200" / "kernels" / "all.json"
    record = json.loads(path.read_text())
    assert all(k in record for k in common.REQUIRED_KEYS)
    assert record["command"] == "cmd" and record["versions"]["torch"]
    assert record["commit"] == "abc123" and record["experiment"] == "kernels"
    on_cpu = common.write_result(tmp_path, "host_overhead", "x", {"device": "cpu", "gpu": None})
    assert on_cpu == tmp_path / "cpu" / "host_overhead" / "x.json"
    named = common.result_path(tmp_path, "NVIDIA H100 80GB HBM3", "throughput", "a")
    assert named == tmp_path / "nvidia-h100-80gb-hbm3" / "throughput" / "a.json"


def test_commit_names_the_checkout_when_no_one_says():
    head = common.commit()
    assert head is None or len(head.removesuffix("-dirty")) == 40


def test_load_results_reads_the_tree_but_not_what_lies_deeper(tmp_path):
    common.write_result(tmp_path, "throughput", "a", {"device": "cpu"}, "c")
    common.write_json(tmp_path / "earlier" / "nvidia-h200" / "throughput" / "b.json", {}, "c")
    common.write_json(tmp_path / "cpu" / "online_latency" / "a_raw" / "rate-2.json", {}, "c")
    assert [r["_file"] for r in common.load_results(tmp_path)] == ["cpu/throughput/a.json"]


def test_every_committed_result_lies_in_the_tree():
    """<gpu>/<experiment>/<label>.json, the GPU folder matching the GPU the result names."""
    records = common.load_results(common.RESULTS)
    assert len(records) > 80
    for record in records:
        gpu, experiment, _ = record["_file"].split("/")
        assert gpu == common.gpu_folder(common.gpu_of(record)), record["_file"]
    assert not list(common.RESULTS.glob("*.json"))  # nothing left outside the tree


def test_report_table_from_results_only(tmp_path):
    synthetic_results(tmp_path)
    text = report.render(tmp_path)
    assert "| llama-3-8b | 512/512 | nanoflow overlapped | 400 | 9,900 | 40.0 | 75.0 |" in text
    assert "transformers static (B=128) |  | 3,000 |  |  |" in text
    assert "continuous" not in text  # a failed mode has no number to quote
    assert "1,000,000,000" not in text  # a file without device/versions/command/date is ignored
    assert "4 req/s" in text
    assert "  | 4 | 40 / 0 | 200.0 | 0.40 | 1,234 |" in text  # every rate's point, in ms/token


def test_latency_table_says_when_no_rate_tried_missed_the_slo(tmp_path):
    points = [{"request_rate": r, "normalized_latency_s": 0.01 * r} for r in (8, 16)]
    latency = ENV | {
        "experiment": "online_latency",
        "result": {"slo_s_per_token": 0.2, "points": points, "max_rate_under_slo": 16},
    }
    common.write_result(tmp_path, "online_latency", "x", latency, "python online")
    text = report.latency_table(report.load_results(tmp_path))
    assert "of 8-16 req/s: at least 16 req/s (every rate tried met it)" in text


def test_headline_takes_each_figure_from_the_best_run_of_its_kind(tmp_path):
    synthetic_results(tmp_path)
    iteration = {
        name: {"iteration": {"gpu_ms": ms}}
        for name, ms in (("sequential", 60.0), ("overlap-green-96/36", 50.0), ("nanobatch-2", 40.0))
    }
    pipeline = ENV | {"experiment": "pipeline", "e2e": {"schedules": iteration}}
    common.write_result(tmp_path, "pipeline", "p", pipeline, "python pipeline_bench.py")
    text = report.headline_table(report.load_results(tmp_path))
    # the fastest nanoflow run, 3.3x the peer's 3,000; nano-batches alone are no overlap
    row = "| NVIDIA H100 80GB HBM3 | 9,900 (40.0%) | 3,000 | 3.3x | 1.20x (overlap-green-96/36) |"
    assert row in text
    assert report.headline_table([]) == ""


def test_report_labels_graph_runs_once_and_tables_an_fp8_kernel_run(tmp_path):
    run = ENV | {
        "experiment": "throughput",
        "model": "llama-3-8b",
        "executor": "sequential-graphs-fp8kv-seqs1024",
        "result": {"workload": "512/512", "tokens_per_s": 1.0, "cuda_graphs": {"graph_steps": 9}},
    }
    common.write_result(tmp_path, "throughput", "graphs", run, "nanoflow bench ...")
    config = {"block_n": 16, "num_warps": 4, "num_stages": 1, "parallel_heads": 4}
    fp8_rows = [
        config | {"context": 1024, "num_ctas": n, "frac_copy_bw": f}
        for n, f in ((33, 0.14), (66, 0.28), (None, 0.71))
    ]
    other = config | {"num_warps": 8, "context": 1024, "num_ctas": None, "frac_copy_bw": 0.5}
    kernels = ENV | {
        "experiment": "kernels",
        "device": "NVIDIA H100 80GB HBM3",
        "ceilings": {"copy_gbs": 3000.0, "gemm_bf16_tflops": 750.0},
        "decode_attention_fp8": {"default_config": config, "rows": [*fp8_rows, other]},
    }
    common.write_result(tmp_path, "kernels", "fp8", kernels, "python bench_kernels.py")
    text = report.render(tmp_path)
    assert "| nanoflow sequential-graphs-fp8kv-seqs1024 |" in text
    assert "fp8 cache (default launch: 4 KV heads x 16 tokens per tile, 4 warps)" in text
    assert "| 1024 | 0.14 | 0.28 |  |  | 0.71 |" in text  # the default launch's rows only


def test_write_replaces_the_results_doc_and_the_readme_headline_only(tmp_path):
    synthetic_results(tmp_path / "results")
    readme, doc = tmp_path / "README.md", tmp_path / "docs" / "results.md"
    readme.write_text(f"# x\n\n{report.START}\nold\n{report.END}\nafter\n")
    argv = ["--results", str(tmp_path / "results"), "--readme", str(readme), "--doc", str(doc)]
    assert report.main([*argv, "--write"]) == 0
    head, rest = readme.read_text().split(report.START)
    assert head == "# x\n\n" and rest.endswith(f"{report.END}\nafter\n")
    assert "| NVIDIA H100 80GB HBM3 | 9,900 (40.0%) |" in rest and "old" not in rest
    assert doc.read_text().startswith("# Results\n")
    assert "| llama-3-8b | 512/512 | nanoflow overlapped | 400 | 9,900 |" in doc.read_text()


def test_committed_docs_and_readme_headline_are_what_the_results_give(tmp_path):
    """docs/results.md and the README's table regenerate from the committed results as is."""
    root = EXPERIMENTS.parent
    readme = tmp_path / "README.md"
    readme.write_text((root / "README.md").read_text())
    argv = ["--readme", str(readme), "--doc", str(tmp_path / "results.md"), "--write"]
    assert report.main(argv) == 0
    assert (tmp_path / "results.md").read_text() == (root / "docs" / "results.md").read_text()
    assert readme.read_text() == (root / "README.md").read_text()


def test_plots_from_results(tmp_path):
    synthetic_results(tmp_path / "results")
    made = plots.make_all(tmp_path / "results", tmp_path / "figures")
    assert sorted(p.name for p in made) == ["ablation.png", "latency.png", "throughput.png"]
    for p in made:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    one_gpu = plots.make_all(tmp_path / "results", tmp_path / "gpu", "NVIDIA H100 80GB HBM3")
    assert "throughput_h100-80gb-hbm3.png" in {p.name for p in one_gpu}
    assert plots.make_all(tmp_path / "results", tmp_path / "none", "NVIDIA H200") == []


def test_throughput_figure_keeps_the_fastest_run_of_each_system(tmp_path):
    """One bar per kind of system and workload: a second, faster sequential run with another
    setting replaces the slower one; the peer is its own kind; other GPUs get their own group."""
    synthetic_results(tmp_path)
    faster = ENV | {
        "experiment": "throughput",
        "model": "llama-3-8b",
        "executor": "sequential-graphs-fp8kv",
        "result": {"workload": "512/512", "num_prompts": 400, "tokens_per_s": 8800.0},
    }
    common.write_result(tmp_path, "throughput", "sequential-fp8", faster, "nanoflow bench ...")
    best = plots.best_runs(report.load_results(tmp_path))
    assert list(best) == ["512/512"]
    runs = best["512/512"]
    assert set(runs) == {"sequential", "nano-batches, no overlap", "overlapped", "transformers"}
    assert runs["sequential"]["tokens_per_s"] == 8800.0
    assert runs["transformers"]["tokens_per_s"] == 3000.0

    other_gpu = faster | {"gpu": "NVIDIA H200", "device": "NVIDIA H200"}
    common.write_result(tmp_path, "throughput", "h200", other_gpu, "nanoflow bench ...")
    groups = plots.best_runs(report.load_results(tmp_path))
    assert sorted(groups) == ["512/512\nH100", "512/512\nH200"]
    assert set(groups["512/512\nH200"]) == {"sequential"}


def test_ablation_compares_an_executor_only_under_the_same_setting():
    def row(system, gpu="NVIDIA H200", workload="lmsys"):
        return {"system": system, "gpu": gpu, "workload": workload, "num_prompts": 1000}

    tuned = plots._ablation_key(row("nanoflow tuned-graphs-fp8kv-seqs1024"))
    sequential = plots._ablation_key(row("nanoflow sequential-graphs-fp8kv-seqs1024"))
    assert tuned == ("tuned", "lmsys (1000)\nH200, CUDA graphs, fp8kv-seqs1024")
    assert sequential == ("sequential", tuned[1])
    eager = plots._ablation_key(row("nanoflow sequential-fp8kv-seqs1024"))
    other_gpu = plots._ablation_key(row("nanoflow sequential-graphs-fp8kv-seqs1024", "NVIDIA H100"))
    assert eager[1] != tuned[1] and other_gpu[1] != tuned[1]
    assert plots._ablation_key(row("transformers static (B=256)")) is None


def test_ablation_skips_a_group_it_cannot_pair(tmp_path):
    for i, (executor, tps) in enumerate(
        (("sequential", 10.0), ("sequential", 12.0), ("nanobatch", 8.0))
    ):
        run = ENV | {
            "experiment": "throughput",
            "model": "llama-3-8b",
            "executor": executor,
            "result": {"workload": "512/512", "tokens_per_s": tps, "num_prompts": 4},
        }
        common.write_result(tmp_path, "throughput", f"run{i}", run, "nanoflow bench ...")
    records = report.load_results(tmp_path)
    assert plots.ablation_bars(records, tmp_path / "ablation.png") is None  # two sequential runs
    assert plots.ablation_bars(records[1:], tmp_path / "ablation.png") is not None


def test_online_latency_starts_the_server_with_the_engine_settings_asked_for():
    args = online_latency.parse_args(["--profile", "p.json", "--kv-cache-dtype", "fp8"])
    command = online_latency.serve_args(args)
    assert command[0] == "llama-3-8b" and "--max-num-seqs" not in command
    assert command[command.index("--profile") + 1] == str(Path("p.json").resolve())
    assert command[command.index("--kv-cache-dtype") + 1] == "fp8"
    args = online_latency.parse_args(["--max-num-seqs", "1024"])
    command = online_latency.serve_args(args)
    assert command[command.index("--max-num-seqs") + 1] == "1024"
    assert command[command.index("--kv-cache-dtype") + 1] == "auto"


def test_online_latency_summary():
    requests = [{"latency_s": 2.0, "ttft_s": 0.1 * i, "output_tokens": 100} for i in range(1, 101)]
    point = online_latency.summarize({"result": {"requests": requests}}, 4.0)
    assert point["normalized_latency_s"] == pytest.approx(0.02)
    assert point["ttft_p99_s"] == pytest.approx(9.9)
    summary = {"completed": 10, "total_output_tokens": 1000, "mean_e2el_ms": 5000.0}
    point = online_latency.summarize({"result": summary | {"p99_ttft_ms": 300.0}}, 2.0)
    assert point["normalized_latency_s"] == pytest.approx(0.05)
    assert point["ttft_p99_s"] == pytest.approx(0.3)
    points = [
        {"request_rate": 1, "normalized_latency_s": 0.1},
        {"request_rate": 2, "normalized_latency_s": 0.3},
        {"request_rate": 4, "normalized_latency_s": 0.1},
    ]
    assert online_latency.max_rate_under_slo(points, 0.2) == 1


def test_online_latency_refuses_a_goodput_slo_without_its_limit():
    with pytest.raises(SystemExit):
        online_latency.parse_args(["--goodput", "ttft"])


def test_detailed_bench_serve_results_give_the_papers_normalized_latency():
    """bench serve --save-detailed lists every request; the latency curve then averages each
    request's latency per output token instead of dividing the means (which weighs long requests
    more)."""
    from nanoflow.cli.bench_serve import RequestResult, _summarize

    results = [
        RequestResult(ok=True, prompt_len=8, output_tokens=10, ttft=0.1, latency=1.0),
        RequestResult(ok=True, prompt_len=8, output_tokens=100, ttft=0.2, latency=2.0),
        RequestResult(ok=False, prompt_len=8, error="HTTP 500: boom"),
    ]
    assert "requests" not in _summarize(results, 4.0)
    detailed = _summarize(results, 4.0, detailed=True)
    assert [r["ok"] for r in detailed["requests"]] == [True, True, False]
    point = online_latency.summarize({"result": detailed}, 2.0)
    assert point["normalized_latency_method"] == "mean of per-request e2e latency / output tokens"
    assert point["normalized_latency_s"] == pytest.approx((1.0 / 10 + 2.0 / 100) / 2)
    assert point["completed"] == 2 and point["failed"] == 1
    assert point["output_tokens_per_s"] == pytest.approx(110 / 4.0)
    assert point["ttft_p99_s"] == pytest.approx(0.2)


def test_runner_labels_a_forced_decode_config(tmp_path, monkeypatch):
    """A throughput run under a forced decode launch configuration gets its own label and
    file, so it never overwrites the default kernel's run."""
    import run

    from nanoflow.kernels.decode_attention import CONFIG_ENV

    class Recorder(run.Runner):
        def run(self, name, cmd, out, stamp):
            self.out, self.stamp = out, stamp

    argv = ["--model", "builtin", "--device", "cpu", "--workloads", "16/4"]
    recorder = Recorder(tmp_path, None, 60.0)
    monkeypatch.setenv(CONFIG_ENV, "16,4,10,4,4,tma")
    run.throughput(recorder, run.parse_args(argv), "16/4", "sequential")
    assert recorder.stamp["executor"] == "sequential-decode16_4_10_4_4_tma"
    label = "builtin-16_4-sequential-decode16_4_10_4_4_tma"
    assert recorder.out == tmp_path / "cpu" / "throughput" / f"{label}.json"


def test_runner_labels_the_budget_and_runs_the_profile_alone(tmp_path, monkeypatch):
    """A run at a given token budget is told apart from the default's; an empty executor list
    with a profile runs the tuned profile only."""
    import run

    throughput, calls = run.throughput, []
    monkeypatch.setattr(run, "throughput", lambda runner, args, w, e: calls.append((w, e)))
    monkeypatch.setattr(run.plots, "make_all", lambda *a: [])
    argv = ["--model", "builtin", "--device", "cpu", "--workloads", "16/4,8/2", "--no-peer"]
    assert run.main([*argv, "--executors", "", "--profile", "p.json", "--out", str(tmp_path)]) == 0
    assert calls == [("16/4", "auto"), ("8/2", "auto")]

    class Recorder(run.Runner):
        def run(self, name, cmd, out, stamp):
            self.cmd, self.stamp = cmd, stamp

    recorder = Recorder(tmp_path, None, 60.0)
    args = run.parse_args([*argv, "--max-num-batched-tokens", "1984", "--profile", "p.json"])
    throughput(recorder, args, "16/4", "auto")
    assert recorder.stamp["executor"] == "tuned-budget1984"
    assert recorder.cmd[recorder.cmd.index("--max-num-batched-tokens") + 1] == "1984"


def test_peer_transformers_dry_run(tmp_path):
    import peer_transformers

    out = tmp_path / "peer.json"
    argv = ["--model", "tiny", "--device", "cpu", "--workload", "16/4", "--num-prompts", "4"]
    assert peer_transformers.main([*argv, "--output-json", str(out)]) == 0
    record = json.loads(out.read_text())
    assert all(k in record for k in common.REQUIRED_KEYS)
    assert record["result"]["static"]["output_tokens"] == 4 * 4
    continuous = record["result"]["continuous"]  # the installed transformers has generate_batch
    assert continuous.get("tokens_per_s", 0) > 0, continuous.get("error")


@pytest.mark.slow
@pytest.mark.parametrize("figure", sorted(reproduce.FIGURES_BY_NAME))
def test_reproduce_dry_run(figure, tmp_path):
    """Each figure's scripts run tiny on CPU and write into the results tree, and the figure
    redraws from the committed results."""
    assert reproduce.main([figure, "--dry-run", "--out", str(tmp_path)]) == 0
    results = common.load_results(tmp_path)
    assert results and all(r["_file"].startswith("cpu/") for r in results)
    for record in results:
        assert "error" not in record, record.get("error")
        assert record["commit"]
    png = reproduce.FIGURES_BY_NAME[figure].png
    assert (tmp_path / "figures" / f"{png}_h200.png").read_bytes()[:4] == b"\x89PNG"
    if figure == "latency":  # the SLO is out of reach: every rate runs however fast this CPU is
        (record,) = results
        points = record["result"]["points"]
        assert [p["request_rate"] for p in points] == [2.0, 4.0]
        for point in points:
            assert point["completed"] == 3 and point["failed"] == 0
            assert point["normalized_latency_method"].startswith("mean of per-request")
            assert point["normalized_latency_s"] > 0
        assert record["result"]["max_rate_under_slo"] == 4.0
        # goodput beside the raw rate: SLOs no CPU run can miss, so every request counts
        assert record["result"]["goodput_slos_ms"] == {"ttft": 1e9, "tpot": 1e9}
        for point in points:
            assert point["goodput_fraction"] == 1.0
            assert point["request_goodput"] == pytest.approx(point["request_throughput"])
        raw = tmp_path / "cpu" / "online_latency" / "builtin-16_4_raw"
        assert (raw / "server.log").is_file() and (raw / "rate-4.json").is_file()
    if figure == "ablation":  # run.py: one result per executor, stamped with its wall time
        assert [r["_file"] for r in results] == [
            "cpu/throughput/builtin-16_4-nanobatch.json",
            "cpu/throughput/builtin-16_4-sequential.json",
        ]
        assert all(r["wall_s"] > 0 for r in results)


def test_reproduce_prints_one_device_call_per_figure(capsys):
    assert reproduce.main(["latency"]) == 0
    printed = capsys.readouterr().out
    call = next(line for line in printed.splitlines() if common.COMMIT_ENV in line)
    assert call.count("experiments/online_latency.py") == 1 and '--out "$OUT"' in call


def test_every_figure_of_the_readme_and_docs_has_a_reproduce_entry():
    root = EXPERIMENTS.parent
    texts = [(root / "README.md").read_text()]
    texts += [p.read_text() for p in sorted((root / "docs").glob("*.md"))]
    shown = {m for t in texts for m in re.findall(r"experiments/figures/([\w.-]+)\.png", t)}
    assert shown
    pngs = {f.png for f in reproduce.FIGURES_BY_NAME.values()}
    for name in shown:
        assert (root / "experiments" / "figures" / f"{name}.png").is_file(), name
        assert any(name == p or name.startswith(f"{p}_") for p in pngs), name


def test_report_renders_pipeline_overlap_and_kernel_runs(tmp_path):
    stamp = {"device": "cuda", "gpu": "GPU-X", "versions": {}, "command": "c", "date": "2026-01-01"}
    pipeline = {
        **stamp,
        "command": "pipeline_bench.py --context 800 --prefill-chunks 0 --kv-cache-dtype fp8",
        "experiment": "pipeline",
        "e2e": {
            "schedules": {
                "sequential": {
                    "iteration": {"gpu_ms": 50.0, "cpu_launch_ms": 20.0},
                    "throughput": {"tokens_per_s": 12345.0},
                    "fraction_of_optimal": 0.25,
                },
                "overlapped": {
                    "iteration": {"gpu_ms": 60.0, "cpu_launch_ms": 1.0},
                    "iteration_eager": {"gpu_ms": 61.0, "cpu_launch_ms": 40.0},
                },
            }
        },
        "overlap": [
            {
                "tokens": 2048,
                "context": 1024,
                "mechanism": "green_context",
                "unit_sms": {"compute": 88, "memory": 44},
                "gemm_full_ms": 0.6,
                "attn_full_ms": 0.4,
                "gemm_part_ms": 0.9,
                "attn_part_ms": 0.8,
                "corun_ms": 0.95,
                "gemm_beside_attn_ms": 0.91,
                "gemm_beside_copy_ms": 0.93,
            }
        ],
    }
    kernels = {
        **stamp,
        "experiment": "kernels",
        "ceilings": {"copy_gbs": 3000.0, "gemm_bf16_tflops": 780.0},
        "decode_attention": {
            "rows": [
                {"context": 1024, "num_ctas": 33, "frac_copy_bw": 0.5},
                {"context": 1024, "num_ctas": None, "frac_copy_bw": 0.9},
            ]
        },
        "decode_green_context": {
            "sms": 32,
            "rows": [
                {"context": 1024, "block_n": 32, "num_warps": 4, "parallel_heads": 4,
                 "frac_copy_bw": 0.5},
                {"context": 1024, "block_n": 128, "num_warps": 4, "parallel_heads": 0,
                 "frac_copy_bw": 0.4},
            ],
        },
    }  # fmt: skip
    graph_run = {
        **stamp,
        "experiment": "throughput",
        "executor": "sequential",
        "model": "m",
        "result": {
            "workload": "512/512",
            "num_prompts": 4,
            "tokens_per_s": 100.0,
            "cuda_graphs": {"graph_steps": 3},
        },
    }
    serve = {
        **stamp,
        "experiment": "serve_bench",
        "model": "m",
        "workload": "512/256",
        "num_prompts": 10,
        "rates": [
            {
                "request_rate": "4",
                "completed": 10,
                "failed": 0,
                "total_token_throughput": 2500.0,
                "median_ttft_ms": 27.0,
                "p99_ttft_ms": 90.0,
                "median_tpot_ms": 7.1,
                "p99_tpot_ms": 7.4,
            }
        ],
    }
    common.write_result(tmp_path, "pipeline", "pipe", pipeline)
    small_kernels = {  # a run of the memory-bound section alone
        **stamp,
        "experiment": "kernels",
        "ceilings": {"copy_gbs": 3000.0, "gemm_bf16_tflops": 780.0},
        "memory_bound": [
            {"kernel": "rms_norm+residual", "tokens": 2048, "ms": 0.0215, "frac_copy_bw": 0.733,
             "torch_eager_ms": 0.1592},
        ],
    }  # fmt: skip
    common.write_result(tmp_path, "kernels", "kern", kernels)
    common.write_result(tmp_path, "kernels", "kern_small", small_kernels)
    common.write_result(tmp_path, "serve_bench", "serve", serve)
    common.write_result(tmp_path, "throughput", "graphs", graph_run)
    text = report.render(tmp_path)
    assert "fixed iteration: 512 decodes at context 800, no prompt tokens, fp8 KV cache:" in text
    assert "| m | 512/512 | nanoflow sequential-graphs | 4 | 100 |" in text
    assert "best of 2 launch configurations (4 KV heads x 32 tokens per tile, 4 warps)" in text
    assert "| sequential | 50.0 | 20.0 |  | 12,345 | 25.0 |  |" in text
    assert "| overlapped | 60.0 | 1.0 | 61.0 / 40.0 |  |  |  |" in text
    assert "| 4 | 10 / 0 | 2,500 | 27 / 90 | 7.1 / 7.4 |" in text
    row = "| 2048 / 1024 | green_context | 88 / 44 | 0.90 / 0.80 | 0.95 | 1.06 | 0.95 |"
    assert row + " 0.91 / 0.93 |" in text
    assert "| rms_norm+residual | 2048 | 0.0215 | 0.73 | 0.1592 |" in text
    assert "over an fp8 cache" not in text  # no empty decode table for the small-kernel run
    assert "| 1024 | 0.50 |  |  |  | 0.90 |" in text
    assert "GEMM 780 TFLOP/s" in text


def test_schedule_replay_counts_every_token_once():
    """Each sequence computes its prompt and every output token but the last."""
    lengths = [(30, 5), (7, 12), (50, 1), (3, 3)]
    mix = schedule_replay.replay(lengths, budget=16, max_num_seqs=2, num_blocks=64, block=4)
    computed = mix["tokens_per_iteration"] * mix["iterations"]
    assert computed == pytest.approx(sum(i + o - 1 for i, o in lengths))
    assert 0 < mix["budget_filled"] <= 1 and 0 <= mix["decode_only_fraction"] < 1


def test_schedule_replay_reproduces_a_measured_run(tmp_path):
    """The scheduler alone decides the iteration mix: replayed with a GPU run's settings, it
    gives that run's iteration count and tokens per iteration."""
    result = common.RESULTS / "nvidia-h100-80gb-hbm3" / "throughput"
    result = result / "llama-3-8b-sharegpt-sequential-graphs.json"
    assert schedule_replay.main(["--result", str(result), "--out", str(tmp_path)]) == 0
    out = tmp_path / "cpu" / "schedule_replay"
    out = out / "nvidia-h100-80gb-hbm3-llama-3-8b-sharegpt-sequential-graphs.json"
    record = json.loads(out.read_text())
    replayed, measured = record["replays"][0], record["measured"]
    assert replayed["iterations"] == measured["iterations"]
    assert replayed["tokens_per_iteration"] == pytest.approx(measured["tokens_per_iteration"])
    assert {"command", "date", "versions"} <= set(record)
