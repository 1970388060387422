"""The autotuner on CPU: cost model, search, profiles and the engine loading one."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from nanoflow import LLM, SamplingParams
from nanoflow.autotune.cost_model import predict
from nanoflow.autotune.search import SearchSpace, run_search, top_candidates
from nanoflow.autotune.steady_state import SteadyBatch, WorkloadShape, steady_batch
from nanoflow.autotune.tables import OpTable, OpTables, load_tables, save_tables
from nanoflow.errors import ProfileError
from nanoflow.models.builtin import BUILTIN_SPEC
from nanoflow.runtime.graph import OpSpec, Resource
from nanoflow.runtime.profile import Profile, load_profile, profile_path, save_profile
from nanoflow.runtime.schedule import (
    LaunchOrder,
    Mechanism,
    PipelineSchedule,
    UnitSpec,
    sequential_schedule,
)

CPU = torch.device("cpu")
SMS = tuple(range(8, 129, 8))


def _linear_op(name: str, resource: str, per_token: float, saturating_sms: int = 0) -> OpTable:
    """``per_token`` seconds per token, on as few as ``saturating_sms`` SMs; slower in proportion
    on fewer."""
    seconds = tuple(
        (tuple(t * per_token * max(1.0, saturating_sms / s) for s in SMS),) for t in (1, 10_000)
    )
    spec = OpSpec(name, Resource(resource), ends_head=name == "decode_attention")
    return OpTable(spec, (1, 10_000), (0,), SMS, seconds)


def _tables(ops: list[OpTable], layers: int, interference: dict) -> OpTables:
    zero = OpTable(OpSpec("lm_head", Resource.COMPUTE), (1,), (0,), (128,), (((0.0,),),))
    return OpTables(
        model="synthetic",
        architecture_hash="x",
        gpu=None,
        sm_count=128,
        gpu_memory_bytes=80 * 2**30,
        num_layers=layers,
        dtype_bytes=2,
        ops=tuple(ops),
        lm_head=zero,
        interference=interference,
    )


def _two_unit(shares: tuple[float, ...], compute: int = 64) -> PipelineSchedule:
    return PipelineSchedule(
        decode_shares=shares,
        prefill_shares=shares,
        units=(UnitSpec("compute", compute), UnitSpec("memory", 128 - compute)),
        op_units={"compute": "compute", "memory": "memory", "network": "compute"},
        overlap=True,
    )


@pytest.mark.parametrize(("factor", "makespan_ms"), [(1.0, 12.0), (1.5, 14.0)])
def test_cost_model_reproduces_a_hand_computed_timeline(factor, makespan_ms):
    """norm (memory, 1 ms/token) -> gemm (compute, 2 ms/token) -> attn (memory, 1 ms/token),
    two nano-batches of 2 tokens, op-major launch order, SMs as measured (no scaling).

    Memory FIFO: norm0 norm1 attn0 attn1; compute FIFO: gemm0 gemm1. Without interference:
    norm0 0-2, norm1 2-4 beside gemm0 2-6, attn0 6-8 beside gemm1 6-10, attn1 10-12.
    With a 1.5x slowdown while they overlap: norm1 2-5 (gemm0 does 2 of its 4 ms meanwhile, then
    5-7 alone), attn0 7-10 beside gemm1 (which does 2 ms of work by 10, ends 12), attn1 12-14.
    """
    ops = [
        _linear_op("norm", "memory", 1e-3),
        _linear_op("gemm", "compute", 2e-3),
        _linear_op("attn", "memory", 1e-3),
    ]
    tables = _tables(ops, 1, {"cta_limit": {"compute+memory": factor}})
    batch = SteadyBatch(decodes=4, prefill_tokens=0, decode_context=0, prompt_len=1)
    prediction = predict(tables, _two_unit((0.5, 0.5)), batch)
    assert prediction.iteration_s == pytest.approx(makespan_ms / 1e3)
    spans = {(iv.op, iv.nano_batch): (iv.start * 1e3, iv.end * 1e3) for iv in prediction.timeline}
    if factor == 1.0:
        expected = {
            ("norm", 0): (0, 2), ("norm", 1): (2, 4), ("gemm", 0): (2, 6),
            ("gemm", 1): (6, 10), ("attn", 0): (6, 8), ("attn", 1): (10, 12),
        }  # fmt: skip
    else:
        expected = {
            ("norm", 0): (0, 2), ("norm", 1): (2, 5), ("gemm", 0): (2, 7),
            ("gemm", 1): (7, 12), ("attn", 0): (7, 10), ("attn", 1): (12, 14),
        }  # fmt: skip
    assert spans == {k: pytest.approx(v) for k, v in expected.items()}
    assert prediction.busy()["compute"] == pytest.approx((8 if factor == 1.0 else 10) / 1e3)
    sequential = predict(tables, sequential_schedule(), batch)
    assert sequential.iteration_s == pytest.approx(16e-3)


@pytest.mark.parametrize(
    ("order", "makespan_ms"), [(LaunchOrder.OP_MAJOR, 12.0), (LaunchOrder.ALTERNATING, 10.0)]
)
def test_cost_model_follows_the_alternating_order_across_layers(order, makespan_ms):
    """qkv (compute, 1 ms) -> decode_attention (memory, 2 ms) -> mlp (compute, 1 ms), two
    layers, two nano-batches of one token. Op-major queues both mlps of a layer before the next
    layer's qkvs, so the second layer's attention starts only at 7: qkv0' 6-7, attn0' 7-9,
    attn1' 9-11, mlp1' 11-12. Alternating queues mlp0, qkv0' before mlp1: qkv0' 4-5, attn0'
    5-7 right after attn1 (3-5), attn1' 7-9, mlp1' 9-10."""
    ops = [
        _linear_op("qkv", "compute", 1e-3),
        _linear_op("decode_attention", "memory", 2e-3),
        _linear_op("mlp", "compute", 1e-3),
    ]
    tables = _tables(ops, 2, {"cta_limit": {"compute+memory": 1.0}})
    batch = SteadyBatch(decodes=2, prefill_tokens=0, decode_context=0, prompt_len=1)
    schedule = dataclasses.replace(_two_unit((0.5, 0.5)), launch_order=order)
    prediction = predict(tables, schedule, batch)
    assert prediction.iteration_s == pytest.approx(makespan_ms / 1e3)
    spans = {
        (iv.layer, iv.op, iv.nano_batch): (iv.start * 1e3, iv.end * 1e3)
        for iv in prediction.timeline
    }
    first_attention_of_layer_1 = (7, 9) if order is LaunchOrder.OP_MAJOR else (5, 7)
    assert spans[(1, "decode_attention", 0)] == pytest.approx(first_attention_of_layer_1)
    assert predict(tables, sequential_schedule(), batch).iteration_s == pytest.approx(16e-3)


def test_launch_bound_applies_only_without_graphs():
    """A slow host bounds an eagerly launched iteration, not one replayed from a graph."""
    import dataclasses

    ops = [OpTable(OpSpec("gemm", Resource.COMPUTE), (1024,), (0,), (128,), (((1e-3,),),))]
    tables = dataclasses.replace(_tables(ops, 4, {}), launch_seconds=2e-3)
    batch = SteadyBatch(decodes=0, prefill_tokens=1024, decode_context=0, prompt_len=1024)
    eager = predict(tables, sequential_schedule(), batch)
    replayed = predict(tables, sequential_schedule(), batch, launch_bound=False)
    assert eager.iteration_s == pytest.approx(8e-3) and eager.gpu_s == pytest.approx(4e-3)
    assert replayed.iteration_s == pytest.approx(4e-3) and replayed.host_s == 0.0


def test_search_finds_the_known_optimum_of_synthetic_tables():
    """A GEMM that scales with every SM beside a memory-bound op that reaches full speed on 32
    SMs. Per layer of 2048 tokens, with c SMs for the GEMM and m = 128 - c (multiples of 8):
    GEMM 6.14 ms * 128 / c, memory op 4.10 ms * max(1, 32 / m). The slower of the two is
    8.19 ms at 96/32, 7.56 ms at 104/24 and 8.19 ms at 112/16: the optimum is 104/24, against
    10.24 ms one after the other."""
    ops = [
        _linear_op("gemm", "compute", 3e-6, saturating_sms=128),
        _linear_op("attn", "memory", 2e-6, saturating_sms=32),
    ]
    tables = _tables(ops, 8, {"green_context": {}})
    shape = WorkloadShape(input_len=1, output_len=1000)
    space = SearchSpace(128, ("green_context",), 2048, 2048, 64)
    ideal = 8 * 2048 * 3e-6 * 128 / 104  # the GEMM never waits
    for seed in range(3):  # the property, whichever way the search samples
        study = run_search(tables, shape, space, trials=80, seed=seed, progress=False)
        best = top_candidates(study, 1)[0]
        units = {u.name: u.num_sms for u in best.schedule.units}
        assert units == {"compute": 104, "memory": 24}, seed
        assert best.schedule.num_nano_batches >= 2
        assert best.predicted_iteration_s < 1.1 * ideal
    sequential = predict(tables, sequential_schedule(), steady_batch(2048, shape))
    assert sequential.iteration_s == pytest.approx(8 * 2048 * 5e-6)


def test_op_tables_round_trip_and_interpolate(tmp_path):
    tables = _tables([_linear_op("gemm", "compute", 1e-6, 128)], 2, {"cta_limit": {}})
    path = tmp_path / "tables.json"
    save_tables(tables, path, {"command": "nanoflow tune x", "device": "cpu"})
    again = load_tables(path)
    assert again == tables  # the provenance rides along without changing the tables
    assert json.loads(path.read_text())["command"] == "nanoflow tune x"
    op = again.ops[0]
    assert op.time(5000, 0, 128) == pytest.approx(5e-3)
    assert op.time(5000, 0, 60) == pytest.approx(5e-3 * (128 / 56 + 128 / 64) / 2)
    assert op.time(20_000, 0, 128) == pytest.approx(2e-2)
    assert op.time(0, 0, 128) == 0.0


def _builtin_profile(**changes) -> Profile:
    schedule = PipelineSchedule(
        decode_shares=(0.5, 0.5),
        prefill_shares=(0.3, 0.7),
        units=(UnitSpec("compute", 100), UnitSpec("memory", 32)),
        op_units={"compute": "compute", "memory": "memory", "network": "compute",
                  "prefill_attention": "memory"},
        launch_order=LaunchOrder.WAVEFRONT,
        mechanism=Mechanism.CTA_LIMIT,
        overlap=True,
    )  # fmt: skip
    fields = dict(
        model="builtin",
        architecture_hash=BUILTIN_SPEC.architecture_hash(),
        gpu_name="NVIDIA H100 80GB HBM3",
        sm_count=132,
        dense_batch_size=24,
        schedule=schedule,
        predicted_iteration_s=0.01,
        measured_iteration_s=0.011,
        measured_tokens_per_s=2200.0,
        tuning_seconds=90.0,
        command="nanoflow tune --model builtin",
        date="2026-11-23T00:00:00+00:00",
    )
    return Profile(**(fields | changes))


def test_profile_round_trips(tmp_path):
    profile = _builtin_profile()
    path = profile_path("builtin", profile.gpu_name, tmp_path)
    assert path == tmp_path / "builtin" / "nvidia-h100-80gb-hbm3.json"
    save_profile(profile, path)
    assert load_profile(path, BUILTIN_SPEC.architecture_hash(), CPU) == profile
    data = json.loads(path.read_text())
    assert data["mechanism"] == "cta_limit" and data["schedule"]["op_units"]["memory"] == "memory"


def _write(path: Path, data) -> Path:
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    return path


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda d: None, "does not exist"),
        (lambda d: "{\"schema_version\": 1, ", "not valid JSON"),
        (lambda d: d | {"schema_version": 0}, "older nanoflow"),
        (lambda d: d | {"schema_version": 99}, "newer nanoflow"),
        (lambda d: d | {"architecture_hash": "0123456789abcdef", "model": "llama-3-8b"},
         "made for model 'llama-3-8b'"),
        (lambda d: d | {"schedule": d["schedule"] | {"decode_shares": [0.9, 0.9]}}, "malformed"),
        (lambda d: d | {"schedule": {"units": []}}, "malformed"),
        (lambda d: {k: v for k, v in d.items() if k != "dense_batch_size"}, "malformed"),
    ],
)  # fmt: skip
def test_bad_profiles_say_what_is_wrong(tmp_path, mutate, message):
    path = tmp_path / "profile.json"
    data = mutate(_builtin_profile().to_dict())
    if data is not None:
        _write(path, data)
    with pytest.raises(ProfileError, match=message):
        load_profile(path, BUILTIN_SPEC.architecture_hash(), CPU)


def test_profile_from_another_gpu_is_refused(tmp_path, monkeypatch):
    class Props:
        name = "NVIDIA A100-SXM4-80GB"
        multi_processor_count = 108

    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: Props())
    path = tmp_path / "profile.json"
    save_profile(_builtin_profile(), path)
    with pytest.raises(ProfileError, match="tuned on NVIDIA H100 80GB HBM3 \\(132 SMs\\)"):
        load_profile(path, BUILTIN_SPEC.architecture_hash(), torch.device("cuda", 0))


def test_engine_runs_a_profile_and_matches_the_sequential_executor(tmp_path):
    path = tmp_path / "profile.json"
    save_profile(_builtin_profile(), path)
    prompts = [[5, 17, 99, 3, 42, 8, 64, 12, 7, 1, 2, 3, 4], [11, 23, 5], [3, 9, 27, 81] * 4]
    params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)

    def tokens(llm: LLM) -> list[list[int]]:
        return [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]

    tuned = LLM("builtin", device="cpu", dtype="float32", profile=str(path))
    assert tuned.engine.scheduler.max_num_batched_tokens == 24
    assert tuned.engine.schedule.num_nano_batches == 2 and tuned.engine.schedule.overlap
    reference = LLM("builtin", device="cpu", dtype="float32", executor="sequential")
    assert tokens(tuned) == tokens(reference)


def test_committed_profiles_load_for_their_models():
    from pathlib import Path

    import torch

    from nanoflow.models.loader import resolve_model
    from nanoflow.runtime.profile import load_profile

    root = Path(__file__).resolve().parent.parent / "profiles"
    paths = sorted(root.glob("*/*.json"))
    assert paths, "no profile committed"
    for path in paths:
        profile = load_profile(
            path, resolve_model(path.parent.name)[0].architecture_hash(), torch.device("cpu")
        )
        assert profile.model == path.parent.name and profile.dense_batch_size > 0


def _shared(attention_sms: int = 32) -> PipelineSchedule:
    return PipelineSchedule(
        decode_shares=(0.5, 0.5),
        prefill_shares=(0.5, 0.5),
        units=(UnitSpec("compute"), UnitSpec("attention", attention_sms, priority=-1)),
        op_units={
            "compute": "compute",
            "memory": "compute",
            "network": "compute",
            "decode_attention": "attention",
        },  # fmt: skip
        overlap=True,
    )


@pytest.mark.parametrize(("shared_factor", "makespan_ms"), [(None, 10.0), (1.5, 11.0)])
def test_cost_model_times_the_shared_sm_layout_with_its_own_interference(
    shared_factor, makespan_ms
):
    """gemm (2 ms/token) on the whole GPU, decode_attention (1 ms/token) beside it; two
    nano-batches of 2 tokens. Unslowed: gemm0 0-4, gemm1 4-8 beside attn0 4-6, attn1 8-10.
    Slowed 1.5x while both run: attn0 4-7 while gemm1 does 2 of its 4 ms, gemm1 then ends at 9,
    attn1 9-11. The partitioned layouts' factor (3x here) does not apply to this layout."""
    ops = [
        _linear_op("gemm", "compute", 2e-3),
        _linear_op("decode_attention", "memory", 1e-3),
    ]
    interference = {"cta_limit": {"compute+memory": 3.0}}
    if shared_factor:
        interference["cta_limit_shared"] = {"compute+memory": shared_factor}
    tables = _tables(ops, 1, interference)
    batch = SteadyBatch(decodes=4, prefill_tokens=0, decode_context=0, prompt_len=1)
    prediction = predict(tables, _shared(), batch)
    assert prediction.iteration_s == pytest.approx(makespan_ms / 1e3)
    assert set(prediction.busy()) == {"compute", "attention"}
    assert tables.mechanisms == ("cta_limit",)
    assert tables.shares_sms == (shared_factor is not None)


def test_search_finds_the_shared_sm_layout_when_it_is_best():
    """Splitting the SMs slows both ops 3x while they overlap; sharing them costs nothing, the
    GEMM keeps all 128 SMs and attention reaches full speed on 32 CTAs: the search must pick the
    shared layout with at least 32 CTAs of attention, over the sequential executor."""
    ops = [
        _linear_op("gemm", "compute", 3e-6, saturating_sms=128),
        _linear_op("decode_attention", "memory", 2e-6, saturating_sms=32),
    ]
    interference = {"cta_limit": {"compute+memory": 3.0}, "cta_limit_shared": {}}
    tables = _tables(ops, 8, interference)
    shape = WorkloadShape(input_len=1, output_len=1000)
    space = SearchSpace(128, tables.mechanisms, 2048, 2048, 64, shared=tables.shares_sms)
    sequential = predict(tables, sequential_schedule(), steady_batch(2048, shape))
    for seed in range(3):  # the property, whichever way the search samples
        study = run_search(tables, shape, space, trials=60, seed=seed, progress=False)
        best = top_candidates(study, 1)[0]
        units = {u.name: u.num_sms for u in best.schedule.units}
        assert units["compute"] is None and units["attention"] >= 32, seed
        assert best.predicted_iteration_s < 0.75 * sequential.iteration_s


def test_an_fp8_cache_lets_the_search_propose_larger_batches():
    """The memory constraint counts the cache's own element size: at one byte per element twice
    the contexts fit, so the largest dense batch grows; the attention tables read half the bytes."""
    from nanoflow.autotune.roofline import roofline_tables
    from nanoflow.autotune.search import batch_limit
    from nanoflow.models.registry import get_known_model

    spec = get_known_model("llama-3-8b")
    shape = WorkloadShape.from_workload("2048/2048")
    wide = roofline_tables(spec, "llama-3-8b")
    narrow = roofline_tables(spec, "llama-3-8b", kv_dtype_bytes=1)
    assert (wide.kv_element_bytes, narrow.kv_element_bytes) == (2, 1)
    wide_limit = batch_limit(spec, wide, shape, max_num_seqs=4096)
    narrow_limit = batch_limit(spec, narrow, shape, max_num_seqs=4096)
    assert 0 < wide_limit < narrow_limit
    attention = {t.name: t for t in wide.ops}["decode_attention"]
    narrow_attention = {t.name: t for t in narrow.ops}["decode_attention"]
    assert narrow_attention.time(256, 2048, 132) < 0.6 * attention.time(256, 2048, 132)


def test_tables_keep_the_cache_element_size(tmp_path):
    tables = _tables([_linear_op("gemm", "compute", 1e-6)], 2, {"cta_limit": {}})
    path = tmp_path / "tables.json"
    save_tables(tables, path)
    assert load_tables(path).kv_element_bytes == 2  # older tables: the model's element size
    save_tables(dataclasses.replace(tables, kv_dtype_bytes=1), path)
    assert load_tables(path).kv_element_bytes == 1


def test_a_profile_runs_only_with_the_cache_it_was_tuned_for(tmp_path):
    path = tmp_path / "profile.json"
    save_profile(_builtin_profile(kv_cache_dtype="fp8"), path)
    assert load_profile(path, BUILTIN_SPEC.architecture_hash(), CPU).kv_cache_dtype == "fp8"
    with pytest.raises(ProfileError, match="tuned for the 'fp8' KV cache.*--kv-cache-dtype fp8"):
        LLM("builtin", device="cpu", dtype="float32", profile=str(path))
    llm = LLM("builtin", device="cpu", dtype="float32", profile=str(path), kv_cache_dtype="fp8")
    assert llm.engine.scheduler.max_num_batched_tokens == 24
    data = _builtin_profile().to_dict() | {"kv_cache_dtype": "int4"}
    with pytest.raises(ProfileError, match="malformed.*int4"):
        load_profile(_write(path, data), BUILTIN_SPEC.architecture_hash(), CPU)
