"""Mixtral (MoE) against transformers on a tiny random checkpoint, in float32 on CPU."""

from __future__ import annotations

import pytest
import torch
from conftest import TINY
from test_model_parity import PROMPTS, _engine, _engine_logits, _hf_greedy, _hf_logits

from nanoflow import LLM, SamplingParams
from nanoflow.models.mixtral import MixtralModel, route_topk

EXPERTS, TOP_K = 4, 2


def _config():
    import transformers

    return transformers.MixtralConfig(
        **TINY,
        num_local_experts=EXPERTS,
        num_experts_per_tok=TOP_K,
        rope_theta=1000000.0,
        sliding_window=None,
    )


@pytest.fixture(scope="module")
def mixtral_checkpoint(tmp_path_factory):
    """(folder, transformers model) of a tiny random Mixtral saved with ``save_pretrained``."""
    import transformers

    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(_config(), dtype=torch.float32)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.2)
    model.eval()
    folder = tmp_path_factory.mktemp("mixtral")
    model.save_pretrained(folder)
    return folder, model


def test_router_matches_transformers():
    from transformers.models.mixtral.modeling_mixtral import MixtralTopKRouter

    router = MixtralTopKRouter(_config())
    torch.nn.init.normal_(router.weight, 0.0, 0.5)
    hidden = torch.randn(300, TINY["hidden_size"])
    weights = torch.empty(300, TOP_K)
    ids = torch.empty(300, TOP_K, dtype=torch.int64)
    with torch.no_grad():
        _, want_weights, want_ids = router(hidden)
        route_topk(hidden @ router.weight.t(), TOP_K, weights, ids)
    assert torch.equal(ids, want_ids)
    torch.testing.assert_close(weights, want_weights, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(weights.sum(-1), torch.ones(300))
    assert len(set(ids.flatten().tolist())) == EXPERTS  # every expert is chosen somewhere


def test_layer_ops_replace_the_dense_mlp(mixtral_checkpoint):
    engine = _engine(mixtral_checkpoint[0])
    model = engine.runner.model
    assert isinstance(model, MixtralModel)
    names = [op.name for op in model.layer_ops[0]]
    assert not {"gate_up_proj", "silu_mul", "down_proj"} & set(names)
    assert names[names.index("post_attn_norm") + 1 :] == ["router", "experts"]
    w = model.layers[0].w
    inter, hidden = TINY["intermediate_size"], TINY["hidden_size"]
    assert w["w13"].shape == (EXPERTS, 2 * inter, hidden)
    assert w["w2"].shape == (EXPERTS, hidden, inter)


def test_prefill_and_decode_logits_match_transformers(mixtral_checkpoint):
    folder, model = mixtral_checkpoint
    engine = _engine(folder)
    seqs = {
        f"r{i}": engine.add_request(f"r{i}", prompt, SamplingParams(max_tokens=8))
        for i, prompt in enumerate(PROMPTS)
    }
    for _ in range(6):
        logits = _engine_logits(engine)
        assert set(logits) == set(seqs)
        for rid, got in logits.items():
            seq = seqs[rid]
            want = _hf_logits(model, seq.all_token_ids)
            diff = (got - want).abs().max().item()
            assert diff <= 1e-4, f"{rid} step {len(seq.output_token_ids)}: {diff}"
            seq.output_token_ids.append(int(want.argmax()))


@pytest.mark.parametrize(
    "engine_kwargs",
    [{}, {"max_num_batched_tokens": 8}, {"executor": "nanobatch"}, {"executor": "overlapped"}],
    ids=["packed", "chunked-prefill", "two-nano-batches", "alternating-pipeline"],
)
def test_greedy_generation_matches_transformers(mixtral_checkpoint, engine_kwargs):
    folder, model = mixtral_checkpoint
    llm = LLM(str(folder), dtype="float32", device="cpu", **engine_kwargs)
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    outputs = llm.generate(PROMPTS, params, use_tqdm=False)
    for prompt, out in zip(PROMPTS, outputs, strict=True):
        assert out.outputs[0].token_ids == _hf_greedy(model, prompt, 12)


@pytest.mark.timeout(300)
def test_tp2_experts_sharded_give_tp1_tokens(mixtral_checkpoint):
    """Each expert's intermediate dim split over two ranks, joined by the MLP all-reduce."""
    folder, _ = mixtral_checkpoint
    params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    tokens = []
    for tp in (1, 2):
        llm = LLM(str(folder), dtype="float32", device="cpu", tensor_parallel_size=tp)
        try:
            tokens.append(
                [o.outputs[0].token_ids for o in llm.generate(PROMPTS, params, use_tqdm=False)]
            )
        finally:
            llm.engine.shutdown()
    assert tokens[0] == tokens[1]


def test_step_graph_path_gives_the_eager_tokens(mixtral_checkpoint):
    """Padded graph shapes (here replayed eagerly) route their padding rows too; the real
    rows' tokens are those of the unpadded steps."""
    folder, _ = mixtral_checkpoint
    params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    tokens = []
    for graphs in (False, True):
        llm = LLM(str(folder), dtype="float32", device="cpu", max_num_batched_tokens=8)
        runner = llm.engine.runner
        if graphs:
            runner.graphs = runner.step_graphs(lambda run: run)
        tokens.append(
            [o.outputs[0].token_ids for o in llm.generate(PROMPTS, params, use_tqdm=False)]
        )
    assert tokens[0] == tokens[1]
    assert runner.graphs.stats.graph_steps > 0 and runner.graphs.stats.eager_steps == 0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("moe_backend", ["grouped", "triton"])
@pytest.mark.parametrize("quantization", [None, "fp8"])
def test_cuda_graphs_replay_the_eager_tokens_on_a_gpu(
    mixtral_checkpoint, moe_backend, quantization
):
    from nanoflow import kernels

    if quantization == "fp8" and moe_backend == "triton":
        pytest.skip("FP8 experts always take the grouped path")
    folder, _ = mixtral_checkpoint
    kernels.set_moe_backend(moe_backend)
    params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    tokens = []
    try:
        for graphs in (False, True):
            llm = LLM(str(folder), dtype="bfloat16", device="cuda", cuda_graphs=graphs,
                      quantization=quantization, max_num_batched_tokens=64,
                      num_kv_blocks=256)  # fmt: skip
            outs = llm.generate(PROMPTS, params, use_tqdm=False)
            tokens.append([o.outputs[0].token_ids for o in outs])
            if graphs:
                assert llm.engine.runner.graphs.stats.graph_steps > 0
    finally:
        kernels.set_moe_backend("grouped")
    assert tokens[0] == tokens[1]
