"""FP8 (W8A8) weights on CPU through the references: the option, the weight type, the linear,
and the engine's paths (executors, step graphs, tensor parallelism, weight offload)."""

from __future__ import annotations

import json

import pytest
import torch

from nanoflow import LLM, SamplingParams, kernels
from nanoflow.cli.main import main as cli_main
from nanoflow.config import EngineConfig
from nanoflow.errors import ConfigError
from nanoflow.kernels.fp8_linear import (
    FP8_DTYPE,
    FP8_MAX,
    Fp8Weight,
    fp8_linear_ref,
    quantize_rows,
    quantize_weight,
)
from nanoflow.models.quantization import cat, flat_tensors, from_flat, quantize_linears

PROMPTS = [[5, 17, 99, 3, 42, 8, 64, 12, 7], [11, 23, 5], [3, 9, 27, 81, 14] * 4]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def test_quantization_is_an_option_with_its_choices():
    assert EngineConfig(quantization="fp8").quantization == "fp8"
    with pytest.raises(ConfigError, match="quantization"):
        EngineConfig(quantization="int8")


def test_every_engine_subcommand_takes_the_flag(capsys):
    for command in (["generate"], ["serve"], ["tune"], ["bench", "throughput"]):
        with pytest.raises(SystemExit):
            cli_main([*command, "--help"])
        assert "--quantization {fp8}" in capsys.readouterr().out, command


@pytest.mark.parametrize("shape", [(1, 16), (7, 64), (33, 100)])
def test_row_quantization_maps_each_row_max_to_e4m3_max(shape):
    torch.manual_seed(0)
    x = torch.randn(shape) * torch.logspace(-3, 3, shape[0])[:, None]
    data, scale = quantize_rows(x)
    assert data.dtype == FP8_DTYPE and scale.shape == shape[:1]
    assert torch.equal(data.float().abs().amax(-1), torch.full(shape[:1], FP8_MAX))
    back = data.float() * scale[:, None]
    assert _rel(back, x) < 0.04  # e4m3 keeps 3 mantissa bits: ~3% per element at worst


def test_all_zero_rows_quantize_to_zero_without_nans():
    data, scale = quantize_rows(torch.zeros(3, 8))
    assert torch.equal(data.float(), torch.zeros(3, 8)) and bool((scale > 0).all())


def test_weight_type_checks_its_parts():
    w = quantize_weight(torch.randn(8, 16))
    assert w.shape == (8, 16) and w.nbytes == 8 * 16 + 8 * 4
    with pytest.raises(ValueError, match="scale"):
        Fp8Weight(w.data, w.scale[:4])
    with pytest.raises(ValueError, match="data"):
        Fp8Weight(w.data.float(), w.scale)


@pytest.mark.parametrize("bias", [False, True])
def test_fp8_linear_reference_is_close_to_the_float_linear(bias):
    torch.manual_seed(1)
    x, w = torch.randn(24, 128), torch.randn(96, 128) * 0.05
    b = torch.randn(96) if bias else None
    want = torch.nn.functional.linear(x, w, b)
    got = kernels.linear(x, quantize_weight(w), b)
    assert got.dtype == x.dtype and _rel(got, want) < 0.06
    out = torch.empty(24, 96)
    assert kernels.linear(x, quantize_weight(w), b, None, out) is out
    assert torch.equal(out, got)


def test_pre_quantized_activations_give_the_same_result():
    torch.manual_seed(2)
    x, w = torch.randn(5, 64), quantize_weight(torch.randn(32, 64))
    data, scale = quantize_rows(x)
    out = torch.empty(5, 32)
    fp8_linear_ref(data, w, None, None, out, x_scale=scale)
    assert torch.equal(out, fp8_linear_ref(x, w))
    with pytest.raises(ValueError, match="x_scale"):
        fp8_linear_ref(data, w)


def test_fused_weights_and_packing_keep_scales_with_their_rows():
    a, b = quantize_weight(torch.randn(4, 8)), quantize_weight(torch.randn(6, 8))
    fused = cat([a, b])
    assert torch.equal(fused.scale, torch.cat([a.scale, b.scale]))
    with pytest.raises(Exception, match="mixes"):
        cat([a, torch.randn(6, 8)])
    layer = {"qkv": fused, "input_norm": torch.ones(8)}
    flat = flat_tensors(layer)
    assert set(flat) == {"qkv.data", "qkv.scale", "input_norm"}
    back = from_flat(flat)
    assert torch.equal(back["qkv"].data.float(), fused.data.float())


def test_only_the_gemm_weights_are_quantized():
    weights = {
        "model.layers.0.self_attn.q_proj.weight": torch.randn(8, 8),
        "model.layers.0.mlp.down_proj.weight": torch.randn(8, 8),
        "model.layers.0.input_layernorm.weight": torch.ones(8),
        "model.layers.0.block_sparse_moe.experts.0.w1.weight": torch.randn(8, 8),
        "model.layers.0.block_sparse_moe.experts.3.w2.weight": torch.randn(8, 8),
        "model.layers.0.block_sparse_moe.gate.weight": torch.randn(4, 8),
        "model.embed_tokens.weight": torch.randn(8, 8),
        "lm_head.weight": torch.randn(8, 8),
    }
    out = quantize_linears(dict(weights))
    quantized = {n for n, w in out.items() if isinstance(w, Fp8Weight)}
    assert quantized == {
        "model.layers.0.self_attn.q_proj.weight",
        "model.layers.0.mlp.down_proj.weight",
        "model.layers.0.block_sparse_moe.experts.0.w1.weight",
        "model.layers.0.block_sparse_moe.experts.3.w2.weight",
    }


def _agreement(a: list[list[int]], b: list[list[int]]) -> float:
    """Fraction of positions where two greedy runs chose the same token."""
    pairs = [(x, y) for r, f in zip(a, b, strict=True) for x, y in zip(r, f, strict=True)]
    return sum(x == y for x, y in pairs) / len(pairs)


def _tokens(folder, **kwargs) -> tuple[list[list[int]], LLM]:
    llm = LLM(str(folder), dtype="float32", device="cpu", **kwargs)
    params = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)
    outs = llm.generate(PROMPTS, params, use_tqdm=False)
    return [o.outputs[0].token_ids for o in outs], llm


@pytest.fixture(scope="module")
def fp8_tokens(llama_checkpoint):
    folder, _ = llama_checkpoint
    tokens, llm = _tokens(folder, quantization="fp8")
    layer = llm.engine.runner.model.layers[0]
    assert all(isinstance(layer.w[n], Fp8Weight) for n in ("qkv", "o", "gate_up", "down"))
    return tokens


def test_fp8_engine_mostly_agrees_with_float32(llama_checkpoint, fp8_tokens):
    folder, _ = llama_checkpoint
    reference, _ = _tokens(folder)
    assert _agreement(reference, fp8_tokens) >= 0.5  # random weights: small logit margins


@pytest.mark.parametrize(
    "kwargs",
    [
        {"executor": "nanobatch"},
        {"executor": "overlapped"},
        {"max_num_batched_tokens": 8},
        {"offload_weights": "cpu", "num_kv_blocks": 64},
        {"offload_weights": "cpu", "offload_fraction": 0.5, "executor": "overlapped"},
    ],
    ids=["nanobatch", "overlapped", "chunked", "offload", "offload-half-overlapped"],
)
def test_fp8_paths_give_the_sequential_tokens(llama_checkpoint, fp8_tokens, kwargs):
    folder, _ = llama_checkpoint
    got, llm = _tokens(folder, quantization="fp8", **kwargs)
    assert got == fp8_tokens
    if "offload_weights" in kwargs:
        plan = llm.engine.runner.offload
        layer = llm.engine.runner.model.layers[plan.host_layers[0]]
        ptr = layer.w["qkv"].data.data_ptr()  # the layer computes from its slot
        assert any(s.data_ptr() <= ptr < s.data_ptr() + s.numel() for s in plan.slots)


def test_fp8_step_graphs_replay_the_eager_tokens(llama_checkpoint, fp8_tokens):
    folder, _ = llama_checkpoint
    llm = LLM(str(folder), dtype="float32", device="cpu", quantization="fp8")
    runner = llm.engine.runner
    runner.graphs = runner.step_graphs(lambda run: run)  # eager "capture" on CPU
    params = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)
    got = [o.outputs[0].token_ids for o in llm.generate(PROMPTS, params, use_tqdm=False)]
    assert got == fp8_tokens and runner.graphs.stats.graph_steps > 0


@pytest.mark.timeout(300)
def test_fp8_tensor_parallel_shards_weights_and_scales(llama_checkpoint, fp8_tokens):
    """Column shards (O, down) keep their full rows' weight scales, but each rank quantizes its
    slice of the activation with its own row scale, so TP=2 is close to TP=1, not equal."""
    folder, _ = llama_checkpoint
    got, llm = _tokens(folder, quantization="fp8", tensor_parallel_size=2)
    try:
        assert _agreement(got, fp8_tokens) >= 0.8
    finally:
        llm.engine.shutdown()


def test_generate_cli_runs_fp8_on_the_builtin_model(capsys):
    cli_main(["generate", "--quantization", "fp8", "--device", "cpu", "--prompt", "Hello",
              "--max-tokens", "4"])  # fmt: skip
    assert "'Hello' ->" in capsys.readouterr().out


def test_profiles_record_the_quantization_and_the_engine_checks_it(tmp_path):
    from nanoflow.engine.schedule_select import select_schedule
    from nanoflow.errors import ProfileError
    from nanoflow.models.builtin import BUILTIN_SPEC
    from nanoflow.runtime.profile import Profile
    from nanoflow.runtime.schedule import sequential_schedule

    profile = Profile(
        model="builtin",
        architecture_hash=BUILTIN_SPEC.architecture_hash(),
        gpu_name=None,
        sm_count=None,
        dense_batch_size=64,
        schedule=sequential_schedule(),
        quantization="fp8",
    )
    assert Profile.from_dict(profile.to_dict()).quantization == "fp8"
    path = tmp_path / "profile.json"
    path.write_text(json.dumps(profile.to_dict()))
    cpu = torch.device("cpu")
    _, budget, _ = select_schedule(EngineConfig(profile=str(path), quantization="fp8"),
                                   BUILTIN_SPEC, cpu)  # fmt: skip
    assert budget == 64
    with pytest.raises(ProfileError, match="quantization"):
        select_schedule(EngineConfig(profile=str(path)), BUILTIN_SPEC, cpu)


def test_fused_quantization_gives_the_tokens_of_quantizing_in_the_gemm(
    llama_checkpoint, fp8_tokens
):
    """In float32 the norms and SiLU-mul that emit e4m3 compute what the GEMM would quantize
    itself, so dropping the step's e4m3 buffers (each GEMM then quantizes its input) changes
    nothing; with them, the producers wrote every buffer the GEMMs read."""
    import dataclasses

    folder, _ = llama_checkpoint
    llm = LLM(str(folder), dtype="float32", device="cpu", quantization="fp8")
    runner = llm.engine.runner
    fused = runner.buffers
    assert fused.normed_q is not None and fused.attn_q is not None and fused.act_q is not None
    runner.buffers = dataclasses.replace(fused, normed_q=None, attn_q=None, act_q=None)
    params = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)
    got = [o.outputs[0].token_ids for o in llm.generate(PROMPTS, params, use_tqdm=False)]
    assert got == fp8_tokens
    assert all(bool((q.scale == 1.0).all()) for q in (fused.normed_q, fused.attn_q, fused.act_q))
    _, used = _tokens(folder, quantization="fp8")
    for q in (used.engine.runner.buffers.normed_q, used.engine.runner.buffers.attn_q,
              used.engine.runner.buffers.act_q):  # fmt: skip
        assert bool((q.scale[:10] != 1.0).all())


def test_mixtral_runs_fp8_experts_and_reads_them_from_an_fp8_checkpoint(tmp_path):
    """Load-time quantization stacks each layer's e4m3 experts with a scale per expert and
    channel; an FP8 checkpoint with per-channel expert scales gives the same tokens; both stay
    close to the float32 model's greedy tokens."""
    import transformers
    from conftest import TINY
    from test_fp8_checkpoints import _compressed_tensors, write_fp8_checkpoint

    config = transformers.MixtralConfig(**TINY, num_local_experts=4, num_experts_per_tok=2)
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "float")
    tokens, llm = _tokens(tmp_path / "float", quantization="fp8")
    layer = llm.engine.runner.model.layers[0]
    assert isinstance(layer.w["qkv"], Fp8Weight) and isinstance(layer.w["w13"], Fp8Weight)
    assert layer.w["w13"].scale.shape == (4, 2 * TINY["intermediate_size"])
    assert isinstance(layer.w["router"], torch.Tensor)
    channel = _compressed_tensors("channel", static_input=False)
    write_fp8_checkpoint(tmp_path / "float", tmp_path / "fp8", channel, per_channel=True)
    assert _tokens(tmp_path / "fp8")[0] == tokens
    assert _agreement(tokens, _tokens(tmp_path / "float")[0]) >= 0.5


def test_offload_slots_are_sized_for_fp8_layers():
    from nanoflow.models.offload import layer_bytes
    from nanoflow.models.registry import get_known_model

    spec = get_known_model("llama-3-8b")
    bf16 = layer_bytes(spec, torch.bfloat16)
    fp8 = layer_bytes(spec, torch.bfloat16, fp8=True)
    assert 0.5 * bf16 < fp8 < 0.51 * bf16  # norms stay bf16, scales are a row each


def test_tune_records_fp8_in_the_profile_and_serve_passes_it_to_the_engine(tmp_path):
    from nanoflow.cli.main import build_parser, engine_kwargs
    from nanoflow.models.builtin import BUILTIN_SPEC
    from nanoflow.runtime.profile import load_profile

    out = tmp_path / "fp8.json"
    argv = ["tune", "--model", "builtin", "--out", str(out), "--trials", "5", "--device", "cpu",
            "--max-batch", "128", "--tables-in", "roofline", "--quantization", "fp8"]  # fmt: skip
    assert cli_main(argv) == 0
    profile = load_profile(out, BUILTIN_SPEC.architecture_hash(), torch.device("cpu"))
    assert profile.quantization == "fp8"
    args = build_parser().parse_args(["serve", "builtin", "--quantization", "fp8"])
    assert engine_kwargs(args)["quantization"] == "fp8"
