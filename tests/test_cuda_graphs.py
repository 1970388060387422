"""Decode-graph bookkeeping (static buffers, buckets, padding rows on a scratch block), checked on
CPU with a capture that replays the forward eagerly: same tokens as the plain path."""

from __future__ import annotations

import pytest

from nanoflow import LLM, SamplingParams
from nanoflow.engine.cuda_graphs import BUCKETS
from nanoflow.errors import ConfigError

PROMPTS = [[5, 17, 99, 3, 42, 8, 64, 12, 7], [11, 23, 5], [3, 9, 27, 81, 14] * 3, [77], [1, 2]]


def _eager(forward):
    return forward


def _tokens(folder, graphs: bool, **kwargs) -> tuple[list[list[int]], set[int]]:
    llm = LLM(str(folder), dtype="float32", device="cpu", **kwargs)
    runner = llm.engine.runner
    if graphs:
        runner.graphs = runner.decode_graphs(_eager)
    params = [SamplingParams(max_tokens=6 + i, temperature=0.0, ignore_eos=True)
              for i in range(len(PROMPTS))]  # fmt: skip
    outs = llm.generate(PROMPTS, params, use_tqdm=False)
    assert llm.engine.blocks.num_free_blocks == llm.engine.blocks.num_blocks
    used = set(runner.graphs.buckets) if runner.graphs else set()
    return [o.outputs[0].token_ids for o in outs], used


@pytest.mark.parametrize("executor", ["sequential", "overlapped"])
@pytest.mark.parametrize("async_scheduling", [False, True])
def test_graph_path_gives_the_same_tokens(llama_checkpoint, executor, async_scheduling):
    folder, _ = llama_checkpoint
    kwargs = {"executor": executor, "async_scheduling": async_scheduling}
    plain, _ = _tokens(folder, False, **kwargs)
    replayed, buckets = _tokens(folder, True, **kwargs)
    assert replayed == plain
    assert buckets and buckets <= set(BUCKETS)  # decode-only steps went through the graphs


def test_scratch_block_is_outside_the_block_managers_range(llama_checkpoint):
    folder, _ = llama_checkpoint
    llm = LLM(str(folder), dtype="float32", device="cpu", num_kv_blocks=10)
    assert llm.engine.blocks.num_blocks == 10
    assert llm.engine.runner.model.layers[0].k_cache.shape[0] == 11


def test_cuda_graphs_need_a_gpu():
    with pytest.raises(ConfigError, match="CUDA"):
        LLM("builtin", device="cpu", cuda_graphs=True)
