"""Nano-batch and overlapped executors give the sequential executor's greedy tokens."""

from __future__ import annotations

import pytest
import torch

from nanoflow import LLM, SamplingParams
from nanoflow.engine.batch import prepare_step
from nanoflow.engine.scheduler import BatchPlan, ScheduledChunk
from nanoflow.engine.sequence import Sequence
from nanoflow.runtime.executors import iteration_order, launch_order
from nanoflow.runtime.graph import Resource
from nanoflow.runtime.schedule import (
    LaunchOrder,
    PipelineSchedule,
    UnitSpec,
    default_overlapped_schedule,
)

PROMPTS = [[5, 17, 99, 3, 42, 8, 64, 12, 7, 1, 2, 3, 4], [11, 23, 5], [3, 9, 27, 81, 14] * 5, [77]]


def _generate(folder, executor: str, max_tokens: int = 10, **kwargs) -> list[list[int]]:
    llm = LLM(str(folder), dtype="float32", device="cpu", executor=executor, **kwargs)
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    return [o.outputs[0].token_ids for o in llm.generate(PROMPTS, params, use_tqdm=False)]


@pytest.mark.parametrize("budget", [64, 12])
def test_executors_agree(hf_checkpoint, budget):
    """Llama 3, Mistral and Qwen2 tiny models; budget 12 cuts prompts into chunks that the
    nano-batch boundaries cut again."""
    _, folder, _ = hf_checkpoint
    reference = _generate(folder, "sequential", max_num_batched_tokens=budget)
    assert _generate(folder, "nanobatch", max_num_batched_tokens=budget) == reference
    assert _generate(folder, "overlapped", max_num_batched_tokens=budget) == reference


@pytest.mark.parametrize("order", [LaunchOrder.WAVEFRONT, LaunchOrder.ALTERNATING])
def test_uneven_three_way_schedule_agrees(llama_checkpoint, order):
    folder, _ = llama_checkpoint
    reference = _generate(folder, "sequential")
    llm = LLM(str(folder), dtype="float32", device="cpu", executor="sequential")
    llm.engine.runner.set_schedule(
        PipelineSchedule(
            decode_shares=(0.5, 0.25, 0.25),
            prefill_shares=(0.2, 0.5, 0.3),
            units=(UnitSpec("compute", 100), UnitSpec("memory", 32)),
            op_units={"compute": "compute", "memory": "memory", "network": "compute"},
            launch_order=order,
            overlap=True,
        )
    )
    params = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)
    got = [o.outputs[0].token_ids for o in llm.generate(PROMPTS, params, use_tqdm=False)]
    assert got == reference


def _seq(rid: str, length: int, block_size: int, first_block: int) -> Sequence:
    seq = Sequence(rid, list(range(1, length + 1)), SamplingParams(max_tokens=4))
    seq.block_table = list(range(first_block, first_block + -(-length // block_size)))
    return seq


def test_nano_batch_boundary_cuts_a_prefill_chunk_and_records_kv_dependency():
    from nanoflow.models.builtin import BUILTIN_SPEC
    from nanoflow.runtime.batch import StepBuffers

    a, b = _seq("a", 10, 4, 0), _seq("b", 6, 4, 10)
    plan = BatchPlan(prefills=[ScheduledChunk(a, 0, 10), ScheduledChunk(b, 0, 6)])
    schedule = PipelineSchedule(decode_shares=(0.5, 0.5), prefill_shares=(0.25, 0.75))
    import torch

    buffers = StepBuffers.allocate(BUILTIN_SPEC, 32, torch.device("cpu"), torch.float32)
    step = prepare_step(plan, schedule, buffers, 4, torch.device("cpu"))
    first, second = step.nano_batches
    assert (first.start, first.end, second.start, second.end) == (0, 4, 4, 16)
    assert second.kv_deps == (0,)
    assert second.prefill.context_lens.tolist() == [10, 6]
    assert second.prefill.cu_q_lens.tolist() == [0, 6, 12]
    assert buffers.positions[:16].tolist() == list(range(10)) + list(range(6))


@pytest.mark.parametrize("order", list(LaunchOrder))
def test_launch_orders_respect_dependencies(order):
    pairs = launch_order(11, 3, order)
    assert sorted(pairs) == [(k, j) for k in range(11) for j in range(3)]
    seen = set()
    for k, j in pairs:
        assert k == 0 or (k - 1, j) in seen
        seen.add((k, j))


@pytest.mark.parametrize("order", list(LaunchOrder))
def test_iteration_orders_launch_every_op_once_after_what_precedes_it(order):
    layers = ((11, 4), (11, 4), (11, 4))
    launches = iteration_order(layers, 3, order)
    assert sorted(launches) == [(L, k, j) for L in range(3) for k in range(11) for j in range(3)]
    seen = set()
    for layer, k, j in launches:
        before = (layer, k - 1, j) if k else (layer - 1, 10, j)
        assert before[0] < 0 or before in seen
        seen.add((layer, k, j))


def test_alternating_order_queues_a_nano_batch_stretch_between_attentions_whole():
    """Nano-batch 0's post-attention ops and its next layer's head (up to and including decode
    attention) are all launched before nano-batch 1's post-attention ops of the same layer."""
    launches = iteration_order(((6, 3), (6, 3)), 2, LaunchOrder.ALTERNATING)
    position = {launch: i for i, launch in enumerate(launches)}
    first_of_nb1_tail = position[(0, 3, 1)]
    assert all(position[(0, k, 0)] < first_of_nb1_tail for k in range(3, 6))
    assert all(position[(1, k, 0)] < first_of_nb1_tail for k in range(3))
    assert launches[:6] == [(0, 0, 0), (0, 1, 0), (0, 2, 0), (0, 0, 1), (0, 1, 1), (0, 2, 1)]


@pytest.mark.parametrize(
    "tp, expected",
    [
        (1, {"compute": None, "attention": 66}),
        (2, {"compute": None, "attention": 66, "network": 16}),
    ],
)
def test_hand_written_schedule_shares_the_sms(tp, expected):
    """GEMMs keep the whole GPU; decode attention alone runs beside them, CTA-limited, on a
    high-priority stream."""
    from nanoflow.config import EngineConfig
    from nanoflow.engine.schedule_select import architecture_schedule

    config = EngineConfig(model="llama-3-8b", device="cpu", tensor_parallel_size=tp)
    schedule = architecture_schedule(config, torch.device("cpu"))
    assert {u.name: u.num_sms for u in schedule.units} == expected
    assert schedule.overlap and schedule.num_nano_batches == 2
    assert schedule.unit_of("decode_attention", Resource.MEMORY).priority == -1
    assert schedule.unit_of("input_norm", Resource.MEMORY).name == "compute"
    assert schedule.op_units["network"] == ("network" if tp > 1 else "compute")


def test_default_schedule_without_a_tensor_parallel_group_has_no_network_unit():
    schedule = default_overlapped_schedule(132)
    assert [u.name for u in schedule.units] == ["compute", "memory"]


@pytest.mark.parametrize("executor", ["sequential", "overlapped"])
def test_async_scheduling_gives_the_same_tokens(llama_checkpoint, executor):
    """Planning iteration i+1 before reading iteration i's tokens changes nothing but timing,
    also with chunked prefill, stop tokens and preemption in play."""
    folder, _ = llama_checkpoint
    kwargs = dict(max_num_batched_tokens=12, num_kv_blocks=8, block_size=8, expected_output_len=1)
    sync = _generate(folder, executor, async_scheduling=False, **kwargs)
    assert _generate(folder, executor, async_scheduling=True, **kwargs) == sync


def test_async_scheduling_with_seeds_and_stop_tokens(llama_checkpoint):
    folder, _ = llama_checkpoint
    params = [
        SamplingParams(max_tokens=9, temperature=1.0, top_p=0.9, seed=11),
        SamplingParams(max_tokens=7, temperature=0.7, top_k=5, seed=12),
        SamplingParams(max_tokens=10, temperature=0.0, stop_token_ids=[PROMPTS[0][3]]),
        SamplingParams(max_tokens=3, temperature=0.0),
    ]

    def run(async_scheduling: bool) -> list[tuple[list[int], str]]:
        llm = LLM(str(folder), dtype="float32", device="cpu", async_scheduling=async_scheduling)
        outs = llm.generate(PROMPTS, params, use_tqdm=False)
        assert llm.engine.blocks.num_free_blocks == llm.engine.blocks.num_blocks
        return [(o.outputs[0].token_ids, o.outputs[0].finish_reason) for o in outs]

    sync = run(False)
    assert run(True) == sync
    assert [len(t) for t, _ in sync][3] == 3
