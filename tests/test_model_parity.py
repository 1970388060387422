"""The engine against Hugging Face transformers on the same tiny checkpoints, in float32."""

from __future__ import annotations

import pytest
import torch

from nanoflow import LLM, SamplingParams
from nanoflow.config import EngineConfig
from nanoflow.engine.engine_core import EngineCore
from nanoflow.engine.sequence import Sequence

PROMPTS = [
    [5, 17, 99, 3, 42, 8, 64, 12, 7],
    [11, 23],
    [3, 9, 27, 81, 14, 42, 126, 120, 100, 31, 45, 66, 72, 18, 54, 90, 17, 23, 29, 31, 37],
    [77],
]


def _engine(folder, **kwargs) -> EngineCore:
    return EngineCore(EngineConfig(model=str(folder), dtype="float32", device="cpu", **kwargs))


def _hf_logits(model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0, -1].float()


def _engine_logits(engine: EngineCore) -> dict[str, torch.Tensor]:
    """Run one iteration by hand and return the logits of each sequence that samples."""
    plan = engine.scheduler.plan()
    with torch.inference_mode():
        step = engine.runner.prepare(plan)
        logits = engine.runner.forward(step)
    engine.scheduler.commit(plan)
    return {c.seq.request_id: logits[i] for i, c in enumerate(step.sampling_chunks)}


def test_prefill_and_decode_logits_match_transformers(hf_checkpoint):
    arch, folder, model = hf_checkpoint
    engine = _engine(folder)
    seqs = {}
    for i, prompt in enumerate(PROMPTS):
        seqs[f"r{i}"] = engine.add_request(f"r{i}", prompt, SamplingParams(max_tokens=8))
    for _ in range(6):
        logits = _engine_logits(engine)
        assert set(logits) == set(seqs)
        for rid, got in logits.items():
            seq: Sequence = seqs[rid]
            want = _hf_logits(model, seq.all_token_ids)
            diff = (got - want).abs().max().item()
            assert diff <= 1e-4, f"{arch} {rid} step {len(seq.output_token_ids)}: {diff}"
            seq.output_token_ids.append(int(want.argmax()))


def _hf_greedy(model, prompt: list[int], max_tokens: int) -> list[int]:
    with torch.no_grad():
        out = model.generate(
            torch.tensor([prompt]),
            max_new_tokens=max_tokens,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=0,
        )
    return out[0, len(prompt) :].tolist()


@pytest.mark.parametrize(
    "engine_kwargs",
    [
        {},
        {"max_num_batched_tokens": 8},  # the longest prompt is split over iterations
        # a small cache and an optimistic output-length guess force preemption
        {"num_kv_blocks": 8, "block_size": 8, "expected_output_len": 1},
    ],
    ids=["packed", "chunked-prefill", "preemption"],
)
def test_greedy_generation_matches_transformers(hf_checkpoint, engine_kwargs):
    arch, folder, model = hf_checkpoint
    llm = LLM(str(folder), dtype="float32", device="cpu", **engine_kwargs)
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    outputs = llm.generate(PROMPTS, params, use_tqdm=False)
    for prompt, out in zip(PROMPTS, outputs, strict=True):
        assert out.outputs[0].token_ids == _hf_greedy(model, prompt, 12), arch
    if "num_kv_blocks" in engine_kwargs:
        assert sum(o.metrics["num_preemptions"] for o in outputs) > 0
    assert llm.engine.blocks.num_free_blocks == llm.engine.blocks.num_blocks
