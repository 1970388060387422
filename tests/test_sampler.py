"""The sampler's logit processing and log-probabilities, on hand-made logits."""

from __future__ import annotations

import math

import pytest
import torch

from nanoflow import LLM, SamplingParams
from nanoflow.engine.sampler import SamplerState, process_logits, sample, score_prompt
from nanoflow.engine.sequence import Sequence

VOCAB = 8


def seq(prompt: list[int] | None = None, **params) -> Sequence:
    return Sequence("r", prompt or [0], SamplingParams(temperature=0.0, **params))


def test_logit_bias_moves_greedy_choice():
    logits = torch.zeros(2, VOCAB)
    logits[:, 3] = 1.0
    out = sample(logits, [seq(logit_bias={5: 2.0}), seq()])
    assert out.token_ids.tolist() == [5, 3]


def test_penalties_follow_the_counts_of_generated_tokens():
    s = seq(prompt=[1], presence_penalty=0.5, frequency_penalty=0.25, repetition_penalty=2.0)
    logits = torch.full((1, VOCAB), 4.0)
    logits[0, 2] = 5.0
    assert sample(logits.clone(), [s]).token_ids.tolist() == [2]
    processed = process_logits(logits.clone(), [s])[0]
    # token 2 seen once: 5 / 2 - 0.25 - 0.5; prompt token 1: 4 / 2; unseen tokens untouched
    assert processed[2].item() == pytest.approx(1.75)
    assert processed[1].item() == pytest.approx(2.0)
    assert processed[0].item() == pytest.approx(4.0)
    assert logits[0, 2].item() == 5.0  # the caller's logits are left alone
    in_place = process_logits(logits, [s], in_place=True)
    assert in_place.data_ptr() == logits.data_ptr()  # a caller done with them spares the copy
    assert torch.equal(in_place[0], processed)


def test_min_tokens_masks_the_ending_tokens_until_reached():
    s = seq(min_tokens=2, max_tokens=4)
    s.sampler_state = SamplerState(banned_until_min=(7,))
    logits = torch.zeros(1, VOCAB)
    logits[0, 7] = 10.0
    assert sample(logits, [s]).token_ids.tolist() != [7]
    s.output_token_ids = [1, 1]
    assert sample(logits, [s]).token_ids.tolist() == [7]


def test_top_logprobs_are_the_real_top_k():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05] + [1e-9] * (VOCAB - 4)]))
    out = sample(logits, [seq(logprobs=3)])
    assert out.top_ids.tolist() == [[0, 1, 2]]
    assert [math.exp(v) for v in out.top_logprobs[0].tolist()] == pytest.approx([0.5, 0.3, 0.15])
    assert out.logprobs.tolist() == pytest.approx([math.log(0.5)])


def test_min_tokens_and_top_logprobs_through_the_engine():
    llm = LLM("builtin", device="cpu", max_model_len=64)
    eos = next(iter(llm.engine.eos_token_ids))
    params = SamplingParams(
        max_tokens=6, min_tokens=6, temperature=0.0, logit_bias={eos: 100.0}, stop_token_ids=[eos]
    )
    (out,) = llm.generate([[5, 6, 7]], params, use_tqdm=False)
    assert len(out.outputs[0].token_ids) == 6 and eos not in out.outputs[0].token_ids
    params = SamplingParams(max_tokens=3, temperature=0.0, logit_bias={eos: 100.0})
    (out,) = llm.generate([[5, 6, 7]], params, use_tqdm=False)
    assert out.outputs[0].token_ids == [eos]


def test_score_prompt_reads_each_rows_target_and_top_k():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.2] + [1e-9] * (VOCAB - 3)] * 2))
    a = Sequence("a", [0, 1, 2], SamplingParams(prompt_logprobs=2))
    b = Sequence("b", [0, 2], SamplingParams(prompt_logprobs=0))
    out = score_prompt(logits, [(a, 2), (b, 1)])
    assert out.token_ids.tolist() == [2, 2]
    assert out.logprobs.tolist() == pytest.approx([math.log(0.2)] * 2)
    assert out.top_ids.tolist() == [[0, 1], [0, 1]]  # the widest asked; b's is cut to none later


def _run(engine, requests) -> dict[str, list]:
    """Add ``(id, prompt, params)`` requests, run them to the end; each one's outputs."""
    for request_id, prompt, params in requests:
        engine.add_request(request_id, prompt, params)
    outputs: dict[str, list] = {r[0]: [] for r in requests}
    for _ in range(500):
        if not engine.has_unfinished:
            break
        for out in engine.step():
            assert out.error is None, out.error
            outputs[out.request_id].append(out)
    assert not engine.has_unfinished
    return outputs


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_prompt_logprobs_are_those_of_generating_the_prompt(async_scheduling):
    """A prompt made of greedily generated tokens scores each token as its generation did,
    whatever the prompt chunking, batch neighbours and prefix cache (bypassed for it)."""
    engine = LLM(
        "builtin", device="cpu", max_model_len=64, max_num_batched_tokens=16,
        enable_prefix_caching=True, async_scheduling=async_scheduling,
    ).engine  # fmt: skip
    greedy = SamplingParams(max_tokens=20, temperature=0.0, logprobs=3, ignore_eos=True)
    (generated,) = _run(engine, [("gen", [5, 6], greedy)]).values()
    tokens = [t for out in generated for t in out.new_token_ids]
    logprobs = [v for out in generated for v in out.new_logprobs]
    top = [t for out in generated for t in out.new_top_logprobs]
    prompt = [5, 6, *tokens]  # 22 tokens: two prompt chunks under a budget of 16
    scored = SamplingParams(max_tokens=2, temperature=0.0, prompt_logprobs=3)
    requests = [("a", prompt, scored), ("b", [9] * 12, greedy), ("c", prompt, scored)]
    outputs = _run(engine, requests)
    for request_id in ("a", "c"):
        first, *rest = outputs[request_id]
        assert all(out.prompt_logprobs is None for out in rest)
        entries = first.prompt_logprobs
        assert len(entries) == len(prompt) and entries[0] is None and all(entries[1:])
        assert [e[0] for e in entries[2:]] == pytest.approx(logprobs, abs=1e-4)
        for entry, alternatives in zip(entries[2:], top, strict=True):
            assert [t for t, _ in entry[1]] == [t for t, _ in alternatives]
            assert entry[1][0][1] == pytest.approx(entry[0], abs=1e-6)  # greedy: the top-1
    assert outputs["b"][0].prompt_logprobs is None
    assert engine.blocks.cached_tokens_served == 0  # "c" recomputed the prompt "a" had


def _prompt_scores(folder, **kwargs) -> list:
    engine = LLM(str(folder), dtype="float32", device="cpu", max_num_batched_tokens=8, **kwargs)
    try:
        params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=2)
        (outputs,) = _run(engine.engine, [("a", [5, 17, 99, 3, 42, 8, 64, 12, 7], params)]).values()
        return outputs[0].prompt_logprobs
    finally:
        engine.engine.shutdown()


@pytest.mark.timeout(300)
def test_prompt_logprobs_under_tensor_parallelism(llama_checkpoint):
    """Every rank computes the logits of the scored rows (the lm_head gathers across ranks)."""
    folder, _ = llama_checkpoint
    one, two = _prompt_scores(folder), _prompt_scores(folder, tensor_parallel_size=2)
    assert one[0] is None and two[0] is None
    for a, b in zip(one[1:], two[1:], strict=True):
        assert a[0] == pytest.approx(b[0], abs=1e-4)
        assert [t for t, _ in a[1]] == [t for t, _ in b[1]]


def _random(**params) -> Sequence:
    return Sequence("r", [0], SamplingParams(temperature=1.0, **params))


def test_unfiltered_rows_sample_the_softmax_and_filtered_rows_keep_their_filters():
    torch.manual_seed(0)
    logits = torch.log(torch.tensor([0.6, 0.3, 0.1] + [1e-9] * (VOCAB - 3))).repeat(3000, 1)
    tokens = sample(logits.clone(), [_random() for _ in range(3000)]).token_ids
    freq = torch.bincount(tokens, minlength=VOCAB).float() / 3000
    assert torch.allclose(freq[:3], torch.tensor([0.6, 0.3, 0.1]), atol=0.03)
    mixed = [_random(top_k=2), _random(top_p=0.5), _random()] * 200  # one batch, both paths
    tokens = sample(logits[:600].clone(), mixed).token_ids.view(200, 3)
    assert set(tokens[:, 0].tolist()) == {0, 1}  # top-2 only
    assert set(tokens[:, 1].tolist()) == {0}  # the top token holds more than half the mass
    assert 2 in set(tokens[:, 2].tolist())  # the unfiltered row reaches the third token


def test_a_seeded_row_draws_the_same_token_whatever_shares_its_batch():
    logits = torch.zeros(3, VOCAB)

    def seeded() -> Sequence:
        return Sequence("s", [0], SamplingParams(temperature=1.0, seed=7))

    alone = sample(logits[:1].clone(), [seeded()]).token_ids.tolist()
    beside = sample(logits.clone(), [_random(), seeded(), _random(top_k=3)]).token_ids.tolist()
    assert beside[1] == alone[0]
