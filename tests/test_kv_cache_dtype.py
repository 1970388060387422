"""``kv_cache_dtype="fp8"``: the engine keeps K/V as float8 e4m3 (the kernels' fp8 paths are
checked against their references in test_kernels.py)."""

from __future__ import annotations

import pytest
import torch

from nanoflow import LLM, SamplingParams
from nanoflow.cli.main import build_parser
from nanoflow.errors import ConfigError

PROMPTS = [[5, 17, 99, 3, 42, 8, 64, 12, 7], [11, 23, 5], [3, 9, 27, 81, 14] * 3, [77]]


def test_fp8_cache_holds_four_times_the_blocks_of_fp32_and_serves():
    """The same host budget holds 4x the blocks of an fp32 cache (2x a bf16 one on a GPU);
    generation runs to the requested lengths and gives every block back."""
    blocks = {}
    for kv in ("auto", "fp8"):
        llm = LLM("builtin", kv_cache_dtype=kv, cpu_kv_cache_gib=0.01)
        runner = llm.engine.runner
        blocks[kv] = runner.num_blocks
        params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
        outs = llm.generate(PROMPTS, params, use_tqdm=False)
        assert all(len(o.outputs[0].token_ids) == 6 for o in outs)
        assert llm.engine.blocks.num_free_blocks == llm.engine.blocks.num_blocks
        expected = torch.float8_e4m3fn if kv == "fp8" else torch.float32
        assert {layer.k_cache.dtype for layer in runner.model.layers} == {expected}
    assert 4 * blocks["auto"] <= blocks["fp8"] < 4 * (blocks["auto"] + 1)


def test_kv_cache_dtype_is_checked_and_reaches_the_engine_from_the_cli():
    with pytest.raises(ConfigError, match="kv_cache_dtype must be auto or fp8"):
        LLM("builtin", kv_cache_dtype="int4")
    args = build_parser().parse_args(["generate", "--kv-cache-dtype", "fp8", "--prompt", "hi"])
    assert args.kv_cache_dtype == "fp8"
