"""The engine's run totals add up: every prompt token and every fed-back output token is
computed exactly once when nothing is preempted."""

from __future__ import annotations

import gc
import json

import pytest

from nanoflow import LLM, SamplingParams
from nanoflow.engine.host_gc import GC_FIRST_GENERATION_THRESHOLD


def test_run_stats_count_every_computed_token():
    llm = LLM("builtin", max_num_batched_tokens=16)
    prompts = [[5] * 20, [6] * 3, [7] * 9]
    params = [SamplingParams(max_tokens=n, ignore_eos=True, temperature=0.0) for n in (4, 7, 1)]
    outs = llm.generate(prompts, params, use_tqdm=False)
    stats = llm.engine.stats
    fed_back = sum(len(o.outputs[0].token_ids) - 1 for o in outs)
    assert stats.tokens == sum(len(p) for p in prompts) + fed_back
    assert stats.decode_tokens == fed_back
    summary = stats.summary()
    assert summary["iterations"] == stats.iterations > 0
    assert 0 < summary["decode_only_fraction"] < 1
    assert summary["tokens_per_iteration"] <= 16


def test_run_stats_split_the_host_time_of_an_iteration():
    """Planning, launching, waiting and resolving are timed apart; off the GPU there are no
    device events, so GPU busy and idle time stay zero."""
    llm = LLM("builtin", max_num_batched_tokens=16)
    params = SamplingParams(max_tokens=3, ignore_eos=True, temperature=0.0)
    llm.generate([[5] * 20, [6] * 3], params, use_tqdm=False)
    stats = llm.engine.stats
    assert stats.plan_seconds > 0 and stats.launch_seconds > 0 and stats.resolve_seconds > 0
    assert stats.wait_seconds < stats.launch_seconds  # on CPU the forward runs in the launch
    assert 0 < stats.prepare_seconds < stats.launch_seconds  # the layout is part of the launch
    summary = stats.summary()
    assert summary["gpu_busy_ms_per_iteration"] == summary["gpu_idle_ms_per_iteration"] == 0
    for phase in ("plan", "launch", "prepare", "wait", "resolve"):
        per_iteration = 1e3 * getattr(stats, f"{phase}_seconds") / stats.iterations
        assert summary[f"host_{phase}_ms_per_iteration"] == pytest.approx(per_iteration)


def test_run_stats_record_each_iteration_shape_for_the_roofline():
    """One prompt of 5 tokens and 3 outputs: a prefill reading its 5 tokens, then two decodes
    reading 6 and 7; the bound of each is the longer of its FLOPs and its bytes."""
    from nanoflow.measure import iteration_bound_seconds

    llm = LLM("builtin", max_num_batched_tokens=64)
    params = SamplingParams(max_tokens=3, ignore_eos=True, temperature=0.0)
    llm.generate([[5, 6, 7, 8, 9]], params, use_tqdm=False)
    stats, spec = llm.engine.stats, llm.engine.spec
    assert stats.shapes == [(5, 5), (1, 6), (1, 7)]
    weights = spec.num_parameters() - spec.vocab_size * spec.hidden_size
    flops_per_token = 2 * spec.params_per_token()
    # memory-bound: a slow copy rate makes the bytes decide
    slow = iteration_bound_seconds(spec, 1, 6, flops_per_token * 1e9, 1.0)
    assert slow == 2 * weights + (6 + 1) * spec.kv_bytes_per_token()
    # compute-bound: a slow GEMM rate makes the FLOPs decide, split over two shards
    assert iteration_bound_seconds(spec, 5, 5, float(flops_per_token), 1e30, shards=2) == 2.5
    total = stats.bound_seconds(spec, float(flops_per_token), 1e30)
    assert total == 5 + 1 + 1


def test_engine_keeps_the_cyclic_collector_out_of_its_loop():
    """Building an engine raises the young-generation threshold, so an iteration's burst of
    short-lived objects sets off no collection."""
    before = gc.get_threshold()
    try:
        gc.set_threshold(700, *before[1:])
        LLM("builtin")
        assert gc.get_threshold()[0] == GC_FIRST_GENERATION_THRESHOLD
    finally:
        gc.set_threshold(*before)


def test_bench_throughput_prints_where_an_iteration_spends_its_time(capsys, tmp_path):
    """`nanoflow bench throughput` says how the host's time per iteration splits and how busy
    the GPU was, the figures that show whether the host keeps up."""
    from nanoflow.cli.main import main

    out = tmp_path / "bench.json"
    argv = ["bench", "throughput", "builtin", "--workload", "16/8", "--num-prompts", "6"]
    assert main([*argv, "--output-json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "Per iteration, host: plan " in printed and "(of it prepare " in printed
    result = json.loads(out.read_text())["result"]
    iterations = result["iterations"]
    assert iterations["host_prepare_ms_per_iteration"] <= iterations["host_launch_ms_per_iteration"]
    # the PyTorch kernels compile nothing; the record says so rather than leaving it out
    assert result["triton_compiles"]["compilations"] == 0
