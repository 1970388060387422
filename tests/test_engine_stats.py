"""The engine's run totals add up: every prompt token and every fed-back output token is
computed exactly once when nothing is preempted."""

from __future__ import annotations

from nanoflow import LLM, SamplingParams


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
