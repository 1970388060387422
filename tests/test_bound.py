"""The iteration bound (autotune/bound.py): a plan's bound worked out by hand from synthetic
tables, never above the sequential time or the cost model's time of the same schedule, monotone
in the work, and printed and recorded by `nanoflow bench throughput` and pipeline_bench.py."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
import torch

from nanoflow.autotune.bound import (
    best_time,
    iteration_bound,
    pair_seconds,
    plan_batch,
    tables_for,
)
from nanoflow.autotune.cost_model import predict
from nanoflow.autotune.roofline import roofline_tables
from nanoflow.autotune.search import SearchSpace, schedule_of
from nanoflow.autotune.steady_state import SteadyBatch
from nanoflow.autotune.tables import SHARED_SMS, OpTable, OpTables, load_tables, save_tables
from nanoflow.engine.sampling_params import SamplingParams
from nanoflow.engine.scheduler import BatchPlan, ScheduledChunk
from nanoflow.engine.sequence import Sequence
from nanoflow.errors import ConfigError, ProfileError
from nanoflow.models.loader import resolve_model
from nanoflow.runtime.graph import DECODE_ATTENTION, OpSpec, Resource, Rows
from nanoflow.runtime.schedule import (
    default_overlapped_schedule,
    nano_batch_schedule,
    sequential_schedule,
    shared_sm_schedule,
)

ROOT = Path(__file__).resolve().parent.parent
MEASURED = ROOT / "experiments" / "results" / "nvidia-h200" / "tune" / "llama-3-8b-tables.json"
US = 1e-6
SMS = (16, 32, 48, 64)


def _table(spec: OpSpec, seconds, contexts=(0,), sms=SMS) -> OpTable:
    tokens = (1, 1024)
    grid = tuple(
        tuple(tuple(seconds(t, c, s) for s in sms) for c in contexts) for t in tokens
    )  # fmt: skip
    return OpTable(spec, tokens, contexts, sms, grid)


def synthetic(compute_memory: float) -> OpTables:
    """Two layers of a GEMM (1 us a row on the whole 64-SM GPU, linear in SMs) and then decode
    attention (0.01 us a token of context, the same at every budget); the LM head 0.5 us a row."""
    gemm = _table(OpSpec("gemm", Resource.COMPUTE), lambda t, c, s: t * US * 64 / s)
    attn = OpSpec(DECODE_ATTENTION, Resource.MEMORY, Rows.DECODE, ends_head=True)
    lm_head = _table(OpSpec("lm_head", Resource.COMPUTE), lambda t, c, s: 0.5 * t * US, sms=(64,))
    return OpTables(
        model="synthetic",
        architecture_hash="-",
        gpu=None,
        sm_count=64,
        gpu_memory_bytes=2**30,
        num_layers=2,
        dtype_bytes=2,
        ops=(gemm, _table(attn, lambda t, c, s: 0.01 * t * c * US, contexts=(1, 1000))),
        lm_head=lm_head,
        interference={"cta_limit": {"compute+memory": compute_memory}},
    )


# 64 decodes at 100 tokens of context, in two nano-batches of 32: the GEMM on 48 SMs,
# attention on 16
BATCH = SteadyBatch(decodes=64, prefill_tokens=0, decode_context=100, prompt_len=0)
OVERLAPPED = default_overlapped_schedule(64, memory_fraction=0.25)
GEMM_48 = 32 * 64 / 48  # us, one nano-batch
ATTN = 32 * 100 * 0.01  # us, one nano-batch
SEQUENTIAL = 2 * (64 + 64) + 32  # us: each layer's two ops over all 64 rows, then the LM head


def test_a_plans_bound_by_hand():
    bound = iteration_bound(synthetic(1.5), OVERLAPPED, BATCH)
    compute, memory = 4 * GEMM_48, 4 * ATTN  # two layers of two nano-batches
    assert bound.units_s == pytest.approx({"compute": compute * US, "memory": memory * US})
    # overlapping costs 1.5x instead of 2x: the shorter side's work saves half of itself
    assert bound.pairs_s == pytest.approx((compute + memory - 0.5 * memory) * US)
    assert bound.critical_path_s == pytest.approx(2 * (GEMM_48 + ATTN) * US)
    assert bound.lm_head_s == pytest.approx(32 * US)
    assert bound.sequential_s == pytest.approx(SEQUENTIAL * US)
    assert bound.bound_s == pytest.approx(bound.pairs_s + 32 * US)
    assert bound.binding == "pairs"


def test_interference_moves_the_bound_between_the_unit_and_the_sequential_time():
    free = iteration_bound(synthetic(1.0), OVERLAPPED, BATCH)
    assert free.bound_s == pytest.approx((4 * GEMM_48 + 32) * US)
    assert free.binding == "units"
    # a pair that runs slower together than one after the other: the sequential time binds
    costly = iteration_bound(synthetic(2.5), OVERLAPPED, BATCH)
    assert costly.schedule_s == pytest.approx((4 * GEMM_48 + 4 * ATTN + 32) * US)
    assert costly.bound_s == pytest.approx(SEQUENTIAL * US)
    assert costly.binding == "sequential"


def test_best_time_is_the_fastest_budget_up_to_the_units():
    noisy = _table(OpSpec("op", Resource.MEMORY), lambda t, c, s: (1.0 if s == 32 else 2.0) * t)
    assert best_time(noisy, 10, 0, 64) == pytest.approx(10.0)
    assert best_time(noisy, 10, 0, 16) == pytest.approx(20.0)
    assert noisy.time(10, 0, 64) == pytest.approx(20.0)


def test_pair_seconds_weighs_each_class_by_its_best_partner():
    factor = {("compute", "memory"): 1.0, ("memory", "compute"): 1.0}
    factor |= {("memory", "memory"): 2.0}
    # the compute work overlaps the other unit's memory work freely, its own memory work not
    u = {"compute": 3.0, "memory": 2.0}
    assert pair_seconds(u, {"memory": 4.0}, factor) == pytest.approx(9.0 - 3.0)
    assert pair_seconds({"memory": 4.0}, u, factor) == pytest.approx(6.0)
    assert pair_seconds({"compute": 5.0}, {"memory": 4.0}, factor) == pytest.approx(5.0)


def _tables() -> list[OpTables]:
    spec, _ = resolve_model("llama-3-8b")
    return [roofline_tables(spec, "llama-3-8b"), load_tables(MEASURED)]


def _random_schedules(tables: OpTables, count: int, seed: int):
    """Schedules of the search's own space, drawn at random."""
    mechanisms = tables.mechanisms or ("cta_limit",)
    space = SearchSpace(tables.sm_count, mechanisms, 64, 4096, shared=tables.shares_sms)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=seed))
    for _ in range(count):
        trial = study.ask()
        yield schedule_of(trial, space)
        study.tell(trial, 0.0)


@pytest.mark.parametrize("which", [0, 1], ids=["roofline", "measured-h200"])
def test_the_bound_never_exceeds_the_sequential_or_the_cost_models_time(which):
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    tables = _tables()[which]
    batches = [
        SteadyBatch(512, 1536, 1024, 512),
        SteadyBatch(1000, 0, 3000, 512),
        SteadyBatch(3, 700, 100, 350),
        SteadyBatch(0, 2048, 0, 2048),
    ]
    named = [sequential_schedule(), nano_batch_schedule(3), default_overlapped_schedule(132)]
    named.append(shared_sm_schedule(132))
    schedules = named + list(_random_schedules(tables, 40, seed=1))
    for batch in batches:
        sequential = predict(tables, sequential_schedule(), batch, launch_bound=False)
        for schedule in schedules:
            bound = iteration_bound(tables, schedule, batch)
            modelled = predict(tables, schedule, batch, launch_bound=False)
            assert bound.schedule_s <= modelled.iteration_s * (1 + 1e-9), schedule
            assert bound.bound_s <= min(modelled.iteration_s, sequential.iteration_s) * (1 + 1e-9)
            assert bound.bound_s > 0


@pytest.mark.parametrize(
    "schedule",
    [sequential_schedule(), nano_batch_schedule(2), default_overlapped_schedule(132)]
    + [shared_sm_schedule(132)],
    ids=["sequential", "nanobatch-2", "overlapped", "shared"],
)
def test_the_bound_is_monotone_in_the_work(schedule):
    tables = _tables()[0]

    def bounds(batches) -> list[float]:
        return [iteration_bound(tables, schedule, b).bound_s for b in batches]

    more = {
        "decodes": [SteadyBatch(d, 512, 1024, 512) for d in range(0, 1025, 64)],
        "prefill": [SteadyBatch(256, p, 1024, 512) for p in range(0, 2049, 128)],
        "context": [SteadyBatch(256, 512, c, 512) for c in range(64, 4097, 256)],
        "prompt": [SteadyBatch(256, 512, 1024, n) for n in range(64, 2049, 128)],
    }
    for kind, batches in more.items():
        times = bounds(batches)
        assert all(b >= a * (1 - 1e-9) for a, b in zip(times, times[1:], strict=False)), kind


def test_an_engine_plan_reads_as_decodes_and_chunks_at_their_contexts():
    def seq(name: str, prompt: int, outputs: int = 0) -> Sequence:
        s = Sequence(name, [5] * prompt, SamplingParams(max_tokens=4))
        s.output_token_ids = [7] * outputs
        return s

    plan = BatchPlan(
        decodes=[ScheduledChunk(seq("a", 10, 1), 10, 1), ScheduledChunk(seq("b", 30, 1), 30, 1)],
        prefills=[ScheduledChunk(seq("c", 20), 0, 8), ScheduledChunk(seq("d", 5), 0, 5)],
    )
    batch, sampled = plan_batch(plan)
    assert batch == SteadyBatch(2, 13, decode_context=21, prompt_len=(8 * 8 + 5 * 5) / 13)
    assert sampled == 3  # both decodes and the prompt that ends


def test_tables_for_refuses_another_models_tables(tmp_path):
    spec, _ = resolve_model("builtin")
    other, _ = resolve_model("llama-3-8b")
    cpu = torch.device("cpu")
    path = tmp_path / "tables.json"
    save_tables(roofline_tables(other, "llama-3-8b"), path)
    with pytest.raises(ProfileError, match="measured for model 'llama-3-8b'"):
        tables_for(str(path), spec, "builtin", cpu)
    save_tables(roofline_tables(spec, "builtin", kv_dtype_bytes=1), path)
    with pytest.raises(ProfileError, match="1-byte KV cache"):
        tables_for(str(path), spec, "builtin", cpu, kv_dtype=torch.bfloat16)
    assert tables_for(str(path), spec, "builtin", cpu, kv_dtype=torch.float8_e4m3fn).ops
    with pytest.raises(ConfigError, match="needs a GPU"):
        tables_for("profile", spec, "builtin", cpu)


def test_measured_tables_hold_the_shared_layouts_interference():
    """The committed H200 tables carry the factor the shared layout's pair term reads."""
    tables = load_tables(MEASURED)
    assert tables.factor(SHARED_SMS, "memory", "compute") > 1.0
    bound = iteration_bound(tables, shared_sm_schedule(132), SteadyBatch(512, 1536, 1024, 512))
    assert bound.pairs_s > max(bound.units_s.values())


def test_bench_throughput_prints_and_records_the_bound(capsys, tmp_path):
    from nanoflow.cli.main import main

    out = tmp_path / "bench.json"
    argv = ["bench", "throughput", "builtin", "--workload", "16/8", "--num-prompts", "4"]
    assert main([*argv, "--tables", "roofline", "--output-json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "Overlap (op tables roofline): measured " in printed and "x the bound" in printed
    result = json.loads(out.read_text())["result"]
    bound = result["overlap_bound"]
    assert bound["iterations"] == result["iterations"]["iterations"]
    assert bound["measured_ms"] == pytest.approx(1e3 * result["elapsed_s"] / bound["iterations"])
    assert bound["measured_over_bound"] == pytest.approx(bound["measured_ms"] / bound["bound_ms"])
    assert 0 < bound["bound_ms"] <= bound["sequential_ms"] * (1 + 1e-9)
    assert main([*argv, "--num-prompts", "2"]) == 0
    assert "No overlap bound: no op tables (--tables)" in capsys.readouterr().out


@pytest.mark.timeout(400)
def test_pipeline_bench_dry_run_sets_each_schedule_beside_its_bound(tmp_path):
    args = ["--device", "cpu", "--model", "builtin", "--budget", "64", "--context", "48"]
    args += ["--schedules", "sequential,overlap-attn-all/66-high", "--skip", "parity"]
    args += ["--skip", "throughput", "--tables", "roofline", "--out", str(tmp_path)]
    script = ROOT / "experiments" / "pipeline_bench.py"
    proc = subprocess.run(
        [sys.executable, str(script), *args], capture_output=True, text=True, cwd=tmp_path
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "sequential: measured " in proc.stdout and "x the bound" in proc.stdout
    (path,) = (tmp_path / "cpu" / "pipeline").glob("*.json")
    e2e = json.loads(path.read_text())["e2e"]
    assert e2e["bound_tables"] == "roofline"
    for row in e2e["schedules"].values():
        bound = row["overlap_bound"]
        assert bound["measured_ms"] == pytest.approx(row["iteration"]["gpu_ms"])
        assert bound["measured_over_bound"] == pytest.approx(
            bound["measured_ms"] / bound["bound_ms"]
        )
        assert bound["terms"]["bound_s"] == pytest.approx(bound["bound_ms"] / 1e3)
