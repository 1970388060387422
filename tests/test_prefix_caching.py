"""Prefix caching: requests sharing a prompt prefix reuse its K/V blocks and still generate the
tokens they would have generated without the cache."""

from __future__ import annotations

import pytest

from nanoflow import LLM, SamplingParams
from nanoflow.engine.block_manager import BlockManager
from nanoflow.engine.scheduler import Scheduler
from nanoflow.engine.sequence import Sequence

SYSTEM = [5, 17, 99, 3, 42, 8, 64, 12, 7, 1, 2, 3, 4, 9, 27, 81, 14, 6, 33, 21]
PROMPTS = [SYSTEM + [11, 23, 5], SYSTEM + [77], SYSTEM[:9] + [8, 8, 8], SYSTEM + [11, 23, 5]]


def _generate(folder, prefix_caching: bool, **kwargs):
    llm = LLM(str(folder), dtype="float32", device="cpu", enable_prefix_caching=prefix_caching,
              block_size=8, **kwargs)  # fmt: skip
    params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    outs = []
    for prompt in PROMPTS:  # one after another, so later requests find earlier prefixes
        outs += llm.generate([prompt], params, use_tqdm=False)
    blocks = llm.engine.blocks
    assert blocks.num_free_blocks == blocks.num_blocks
    tokens = [o.outputs[0].token_ids for o in outs]
    return tokens, [int(o.metrics["num_cached_tokens"]) for o in outs]


@pytest.mark.parametrize("async_scheduling", [False, True])
@pytest.mark.parametrize("budget", [8, 64])
def test_cached_prefixes_give_the_same_tokens(llama_checkpoint, async_scheduling, budget):
    folder, _ = llama_checkpoint
    kwargs = {"async_scheduling": async_scheduling, "max_num_batched_tokens": budget}
    plain, none_cached = _generate(folder, False, **kwargs)
    cached, hits = _generate(folder, True, **kwargs)
    assert cached == plain
    assert none_cached == [0, 0, 0, 0]
    # 20 shared tokens = 2 full blocks of 8; the third prompt shares only its first block; the
    # repeated prompt gets all its full blocks (one token is always left to compute)
    assert hits == [0, 16, 8, 16]


def test_a_small_cache_evicts_idle_prefixes_and_stays_correct(llama_checkpoint):
    folder, _ = llama_checkpoint
    kwargs = {"num_kv_blocks": 6, "max_num_batched_tokens": 16}
    plain, _ = _generate(folder, False, **kwargs)
    cached, _ = _generate(folder, True, **kwargs)
    assert cached == plain


def test_shared_blocks_are_counted_once_and_come_back_when_idle():
    blocks = BlockManager(num_blocks=8, block_size=4, prefix_caching=True)
    scheduler = Scheduler(blocks, max_num_batched_tokens=64, max_num_seqs=4)
    first = Sequence("a", list(range(10)), SamplingParams(max_tokens=2))
    scheduler.add(first)
    scheduler.commit(scheduler.plan())  # 10 tokens: blocks 0-1 full, remembered
    second = Sequence("b", list(range(8)) + [50, 51], SamplingParams(max_tokens=2))
    scheduler.add(second)
    plan = scheduler.plan()
    assert second.num_cached_tokens == 8 and plan.prefills[0].start == 8
    assert second.block_table[:2] == first.block_table[:2]
    assert blocks.num_free_blocks == 8 - 4  # 3 blocks for a, 1 more for b
    scheduler.finish(first, "abort")
    scheduler.finish(second, "abort")
    assert blocks.num_free_blocks == 8 and blocks.cached_tokens_served == 8


def test_metrics_report_prefix_cache_hits():
    from nanoflow.server.metrics import ServerMetrics

    stats = {"running": 0, "waiting": 0, "kv_usage": 0.0, "free_blocks": 8, "num_blocks": 8,
             "prefix_cached_tokens": 16}  # fmt: skip
    text = ServerMetrics("m").render(stats).decode()
    assert 'nanoflow_prefix_cache_hit_tokens{model_name="m"} 16.0' in text


def test_kv_offload_brings_evicted_prefixes_back_from_host(llama_checkpoint):
    """A conversation's earlier round, pushed out of a small GPU cache by another one, comes
    back from host memory: same tokens as recomputing, and counted as restored."""
    folder, _ = llama_checkpoint
    other = [60 + i for i in range(40)]
    rounds = [SYSTEM + [11, 23, 5], other, SYSTEM + [11, 23, 5, 9, 9]]
    params = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)

    def run(**kwargs):
        llm = LLM(str(folder), dtype="float32", device="cpu", block_size=8, num_kv_blocks=7,
                  **kwargs)  # fmt: skip
        outs = [llm.generate([p], params, use_tqdm=False)[0] for p in rounds]
        return llm.engine.blocks, [o.outputs[0].token_ids for o in outs], outs[-1]

    _, plain, _ = run()
    blocks, offloaded, last = run(enable_prefix_caching=True, kv_offload_gib=0.001)
    assert offloaded == plain
    # the other conversation evicted one of the two shared blocks: it comes back from host
    assert blocks.host_tokens_restored == 8 and last.metrics["num_cached_tokens"] == 16
    assert blocks.num_free_blocks == blocks.num_blocks


def test_kv_offload_needs_prefix_caching():
    from nanoflow.errors import ConfigError

    with pytest.raises(ConfigError, match="enable_prefix_caching"):
        LLM("builtin", device="cpu", kv_offload_gib=1.0)
