"""The sampler's logit processing and log-probabilities, on hand-made logits."""

from __future__ import annotations

import math

import pytest
import torch

from nanoflow import LLM, SamplingParams
from nanoflow.engine.sampler import SamplerState, process_logits, sample
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
    llm = LLM("builtin", max_model_len=64)
    eos = next(iter(llm.engine.eos_token_ids))
    params = SamplingParams(
        max_tokens=6, min_tokens=6, temperature=0.0, logit_bias={eos: 100.0}, stop_token_ids=[eos]
    )
    (out,) = llm.generate([[5, 6, 7]], params, use_tqdm=False)
    assert len(out.outputs[0].token_ids) == 6 and eos not in out.outputs[0].token_ids
    params = SamplingParams(max_tokens=3, temperature=0.0, logit_bias={eos: 100.0})
    (out,) = llm.generate([[5, 6, 7]], params, use_tqdm=False)
    assert out.outputs[0].token_ids == [eos]
