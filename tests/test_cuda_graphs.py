"""Step-graph bookkeeping (padded shapes, static buffers, chunk slots, scratch-block padding),
checked on CPU with a capture that replays the step eagerly: same tokens as the unpadded path."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from nanoflow import LLM, SamplingParams
from nanoflow.engine.batch import lay_out, prepare_step
from nanoflow.engine.cuda_graphs import DECODE_ROUND, PREFILL_ROUND, _write_tables
from nanoflow.engine.scheduler import BatchPlan, ScheduledChunk
from nanoflow.engine.sequence import Sequence
from nanoflow.engine.upload import copy_to, to_device
from nanoflow.errors import ConfigError
from nanoflow.runtime.static_step import CHUNK_SLOTS, chunk_slots

PROMPTS = [[5, 17, 99, 3, 42, 8, 64, 12, 7], [11, 23, 5], [3, 9, 27, 81, 14] * 3, [77], [1, 2]]


def _eager(run):
    return run


def _generate(folder, graphs: bool, prompts=PROMPTS, **kwargs):
    llm = LLM(str(folder), dtype="float32", device="cpu", **kwargs)
    runner = llm.engine.runner
    assert runner.graphs is None  # off by default on CPU
    if graphs:
        runner.graphs = runner.step_graphs(_eager)
    params = [SamplingParams(max_tokens=6 + i % 5, temperature=0.0, ignore_eos=True)
              for i in range(len(prompts))]  # fmt: skip
    outs = llm.generate(prompts, params, use_tqdm=False)
    assert llm.engine.blocks.num_free_blocks == llm.engine.blocks.num_blocks
    return [o.outputs[0].token_ids for o in outs], runner.graphs


@pytest.mark.parametrize("executor", ["sequential", "overlapped"])
@pytest.mark.parametrize("async_scheduling", [False, True])
def test_graph_path_gives_the_same_tokens(llama_checkpoint, executor, async_scheduling):
    folder, _ = llama_checkpoint
    # a small token budget so prompts are split into chunks that share steps with decodes
    kwargs = {"executor": executor, "async_scheduling": async_scheduling,
              "max_num_batched_tokens": 8}  # fmt: skip
    plain, _ = _generate(folder, False, **kwargs)
    replayed, graphs = _generate(folder, True, **kwargs)
    assert replayed == plain
    shapes = set(graphs.graphs)
    assert graphs.stats.shapes_captured == len(shapes)
    assert graphs.stats.eager_steps == 0 and graphs.stats.graph_steps > len(shapes)
    decode_rows = [sum(shape.decode_rows) for shape in shapes]
    prefill_rows = [sum(shape.prefill_rows) for shape in shapes]
    assert all(d % DECODE_ROUND == 0 for d in decode_rows)
    assert all(p % PREFILL_ROUND == 0 for p in prefill_rows)
    mixed = [d and p for d, p in zip(decode_rows, prefill_rows, strict=True)]
    assert any(mixed) and 0 in prefill_rows  # mixed and decode-only steps both went through


@pytest.mark.parametrize("executor", ["sequential", "nanobatch"])
def test_a_step_with_more_chunks_than_the_smallest_bucket_replays(llama_checkpoint, executor):
    folder, _ = llama_checkpoint
    prompts = [[3 + i, 5, 7 + i] for i in range(3 * CHUNK_SLOTS)]  # all prefill in one step
    kwargs = {"executor": executor, "max_num_batched_tokens": 96}
    plain, _ = _generate(folder, False, prompts, **kwargs)
    replayed, graphs = _generate(folder, True, prompts, **kwargs)
    assert replayed == plain
    assert graphs.stats.eager_steps == 0 and graphs.stats.graph_steps >= 1
    assert max(max(shape.chunk_slots) for shape in graphs.graphs) > CHUNK_SLOTS


def test_past_the_graph_cap_new_shapes_run_eagerly(llama_checkpoint, monkeypatch):
    from nanoflow.engine import cuda_graphs

    monkeypatch.setattr(cuda_graphs, "MAX_GRAPHS", 1)
    folder, _ = llama_checkpoint
    kwargs = {"executor": "sequential", "max_num_batched_tokens": 8}
    plain, _ = _generate(folder, False, **kwargs)
    replayed, graphs = _generate(folder, True, **kwargs)
    assert replayed == plain
    assert len(graphs.graphs) == 1 and graphs.stats.eager_steps > 0


def test_uploads_keep_values_and_dtypes():
    ids = to_device([3, 1, 2], torch.int64, torch.device("cpu"))
    assert ids.dtype == torch.int64 and ids.tolist() == [3, 1, 2]
    target = torch.zeros(4, dtype=torch.int32)
    copy_to(target[1:3], torch.tensor([7, 9], dtype=torch.int32))
    assert target.tolist() == [0, 7, 9, 0]


def _seq(rid: str, prompt_len: int, first_block: int, block_size: int = 4) -> Sequence:
    seq = Sequence(rid, list(range(1, prompt_len + 1)), SamplingParams(max_tokens=4))
    seq.block_table = list(range(first_block, first_block + -(-prompt_len // block_size)))
    return seq


def test_padded_layout_fills_nano_batches_in_order_and_pads_the_rest():
    a, b = _seq("a", 10, 0), _seq("b", 6, 3)
    plan = BatchPlan(prefills=[ScheduledChunk(a, 0, 10), ScheduledChunk(b, 0, 6)])
    layout = lay_out(plan, [0, 0], [12, 12], block_size=4, pad_slot=99)
    first, second = layout.nano_batches
    assert (first.start, first.end, second.start, second.end) == (0, 12, 12, 24)
    assert [(c.seq.request_id, c.start, c.num_tokens) for c in second.pieces] == [("b", 2, 4)]
    assert second.kv_deps == (0,)  # b's first two tokens are in the first nano-batch
    assert layout.slots[16:] == [99] * 8 and layout.input_ids[16:] == [0] * 8
    assert layout.sample_rows == [9, 15]  # each prompt's last token


def test_layout_rejects_a_plan_larger_than_its_rows():
    plan = BatchPlan(prefills=[ScheduledChunk(_seq("a", 10, 0), 0, 10)])
    with pytest.raises(ValueError, match="more tokens"):
        lay_out(plan, [0], [8], block_size=4)


def test_cuda_graphs_need_a_gpu():
    with pytest.raises(ConfigError, match="CUDA"):
        LLM("builtin", device="cpu", cuda_graphs=True)


def test_cuda_graphs_refuse_weight_offload():
    with pytest.raises(ConfigError, match="offload_weights"):
        LLM("builtin", device="cpu", cuda_graphs=True, offload_weights="cpu")


def test_graphs_are_on_by_default_on_one_gpu_for_dense_and_moe_models(llama_checkpoint):
    import dataclasses

    folder, _ = llama_checkpoint
    runner = LLM(str(folder), dtype="float32", device="cpu").engine.runner
    assert not runner._use_cuda_graphs()  # on CPU
    runner.device = torch.device("cuda")  # the rule alone: nothing is captured here
    assert runner._use_cuda_graphs()
    runner.spec = dataclasses.replace(runner.spec, num_experts=8, num_experts_per_token=2)
    assert runner._use_cuda_graphs()  # MoE routing and experts read nothing back to the host


def _capture_up_front(folder, max_decodes: int, **kwargs):
    """The tokens without graphs, and an engine on the graph path whose start-up shapes (decode
    counts up to ``max_decodes``) were captured before any request (with the number captured)."""
    plain, _ = _generate(folder, False, **kwargs)
    llm = LLM(str(folder), dtype="float32", device="cpu", **kwargs)
    runner = llm.engine.runner
    runner.graphs = runner.step_graphs(_eager)
    runner.capture_startup_graphs(max_decodes, llm.engine.scheduler.max_num_batched_tokens)
    return plain, llm, runner.graphs.stats.shapes_captured


def _greedy(llm) -> list[list[int]]:
    params = [SamplingParams(max_tokens=6 + i % 5, temperature=0.0, ignore_eos=True)
              for i in range(len(PROMPTS))]  # fmt: skip
    return [o.outputs[0].token_ids for o in llm.generate(PROMPTS, params, use_tqdm=False)]


def test_shapes_captured_up_front_serve_the_run(llama_checkpoint):
    """Start-up capture takes every decode-only shape up to the sequence limit and every decode
    count beside prompt tokens filling the budget: a run that keeps its budget full then
    captures nothing, and gives the same tokens as without graphs."""
    folder, _ = llama_checkpoint
    kwargs = {"executor": "sequential", "max_num_batched_tokens": 8, "max_num_seqs": 40}
    plain, llm, captured = _capture_up_front(folder, 40, **kwargs)
    graphs = llm.engine.runner.graphs
    shapes = sorted((sum(s.decode_rows), sum(s.prefill_rows)) for s in graphs.graphs)
    # 8 tokens at most: 1-7 decodes beside 1-7 prompt tokens round up to 16 and 64 rows
    assert shapes == [(0, 64), (16, 0), (16, 64), (32, 0), (48, 0)] and captured == 5
    assert _greedy(llm) == plain
    assert graphs.stats.shapes_captured == captured and graphs.stats.graph_steps > 0
    assert llm.engine.blocks.num_free_blocks == llm.engine.blocks.num_blocks


def test_shapes_captured_up_front_serve_nano_batches(llama_checkpoint):
    """With two nano-batches the stand-in prompt is split between them, as a real one is: the
    run replays the start-up graphs and gives the same tokens as without graphs."""
    folder, _ = llama_checkpoint
    kwargs = {"executor": "nanobatch", "max_num_batched_tokens": 24, "max_num_seqs": 16}
    plain, llm, captured = _capture_up_front(folder, 16, **kwargs)
    assert captured > 1
    assert _greedy(llm) == plain
    graphs = llm.engine.runner.graphs
    assert graphs.stats.graph_steps > 0 and graphs.stats.eager_steps == 0
    assert graphs.stats.shapes_captured == captured  # nothing captured during the run


def test_start_up_capture_stops_at_the_graph_cap(llama_checkpoint, monkeypatch):
    """With room for two graphs, start-up capture takes the two smallest decode shapes and
    stops; the run's other shapes then go eagerly and the tokens stay the same."""
    from nanoflow.engine import cuda_graphs

    monkeypatch.setattr(cuda_graphs, "MAX_GRAPHS", 2)
    folder, _ = llama_checkpoint
    kwargs = {"executor": "sequential", "max_num_batched_tokens": 8, "max_num_seqs": 64}
    plain, llm, captured = _capture_up_front(folder, 64, **kwargs)
    graphs = llm.engine.runner.graphs
    assert captured == 2
    assert sorted(sum(s.decode_rows) for s in graphs.graphs) == [16, 32]
    assert _greedy(llm) == plain
    assert len(graphs.graphs) == 2 and graphs.stats.eager_steps > 0


def test_block_tables_are_scattered_row_by_row_and_leave_other_rows_alone():
    """The numpy scatter of ragged block tables: each row gets its sequence's table and context
    length; rows outside the chunks, and columns past each table, keep what they held."""
    rng = np.random.default_rng(0)
    tables = np.full((6, 5), -7, dtype=np.int32)
    lens = np.full(6, -7, dtype=np.int32)
    chunks = []
    for i, width in enumerate((3, 1, 5)):
        seq = Sequence(f"s{i}", [1] * 4, SamplingParams(max_tokens=2))
        seq.block_table = rng.integers(0, 100, size=width).tolist()
        chunks.append(ScheduledChunk(seq, start=10 * i, num_tokens=1 + i))
    assert _write_tables(tables, lens, 2, chunks) == 5  # the longest table
    for row, chunk in enumerate(chunks, start=2):
        table = chunk.seq.block_table
        assert tables[row, : len(table)].tolist() == table
        assert (tables[row, len(table) :] == -7).all()
        assert lens[row] == chunk.start + chunk.num_tokens
    assert (tables[:2] == -7).all() and (tables[5] == -7).all()
    assert lens[[0, 1, 5]].tolist() == [-7, -7, -7]


BLOCK = 8


class _Blocks:
    """Hands out fresh KV blocks, so each stand-in sequence owns its cache slots."""

    def __init__(self) -> None:
        self.next = 0

    def sequence(self, rid: str, prompt: list[int], extra: int = 0) -> Sequence:
        seq = Sequence(rid, prompt, SamplingParams(max_tokens=4))
        count = -(-(len(prompt) + extra) // BLOCK)
        seq.block_table = list(range(self.next, self.next + count))
        self.next += count
        return seq


def _random_plans(
    rng: np.random.Generator, blocks: _Blocks, prompts: int, decodes: int, continued: int
) -> tuple[BatchPlan, BatchPlan]:
    """An earlier plan that computes some K/V, then a plan over it: ``decodes`` decodes,
    ``continued`` prompts whose start was computed before, ``prompts`` fresh ones (short, so a
    nano-batch holds many chunks), in random order with random tokens."""
    before, plan = BatchPlan(), BatchPlan()

    def tokens(n: int) -> list[int]:
        return rng.integers(3, 128, n).tolist()

    for i in range(decodes):
        seq = blocks.sequence(f"d{i}", tokens(int(rng.integers(1, 9))), extra=1)
        before.prefills.append(ScheduledChunk(seq, 0, seq.num_tokens))
        seq.output_token_ids = tokens(1)
        plan.decodes.append(ScheduledChunk(seq, seq.num_tokens - 1, 1))
    for i in range(continued):
        seq = blocks.sequence(f"c{i}", tokens(int(rng.integers(4, 13))))
        done = int(rng.integers(1, seq.num_tokens))
        before.prefills.append(ScheduledChunk(seq, 0, done))
        plan.prefills.append(ScheduledChunk(seq, done, seq.num_tokens - done))
    for i in range(prompts):
        seq = blocks.sequence(f"p{i}", tokens(int(rng.integers(1, 6))))
        plan.prefills.append(ScheduledChunk(seq, 0, seq.num_tokens))
    plan.prefills = [plan.prefills[i] for i in rng.permutation(len(plan.prefills))]
    return before, plan


def _chunks_in_slots(step) -> list[tuple[int, int, int]]:
    """Each nano-batch's (chunks with queries, chunk slots, prefill rows)."""
    out = []
    for nb in step.nano_batches:
        if nb.prefill is not None:
            lens = nb.prefill.cu_q_lens.diff()
            out.append((int((lens > 0).sum()), len(lens), nb.num_tokens - nb.num_decode))
    return out


@pytest.fixture
def kernel_backend(request):
    from nanoflow import kernels

    kernels.set_backend(request.param)
    yield request.param
    kernels.set_backend("auto")


@pytest.mark.parametrize(
    ("kernel_backend", "executor", "seed", "prompts"),
    [("reference", "sequential", 0, 36), ("reference", "nanobatch", 1, 36),
     ("triton", "sequential", 2, 12)],  # the interpreter is slow: one bucket of 32 slots
    indirect=["kernel_backend"],
)  # fmt: skip
@torch.inference_mode()
def test_many_chunk_steps_replay_with_the_eager_logits(
    llama_checkpoint, kernel_backend, executor, seed, prompts
):
    """Steps of more chunks per nano-batch than the smallest bucket, on fresh random tokens, K/V
    and chunk positions, go through the graph path; the prefill kernels see each nano-batch's
    bucket of slots, and the logits are the unpadded eager step's."""
    folder, _ = llama_checkpoint
    llm = LLM(str(folder), dtype="float32", device="cpu", executor=executor, block_size=BLOCK,
              max_num_batched_tokens=160, num_kv_blocks=256)  # fmt: skip
    runner = llm.engine.runner
    graphs = runner.step_graphs(_eager)
    rng = np.random.default_rng(seed)
    before, plan = _random_plans(rng, _Blocks(), prompts, decodes=5, continued=4)
    runner.forward(runner.prepare(before))
    eager = runner.forward(runner.prepare(plan))
    step = graphs.prepare(plan)
    assert step is not None and graphs.stats.eager_steps == 0
    slots = _chunks_in_slots(step)
    assert all(n == chunk_slots(chunks, rows) for chunks, n, rows in slots)
    assert max(n for _, n, _ in slots) > CHUNK_SLOTS
    assert sum(chunks for chunks, _, _ in slots) >= len(plan.prefills)
    torch.testing.assert_close(runner.forward(step), eager, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("executor", ["sequential", "nanobatch"])
def test_no_plan_within_the_token_budget_runs_eagerly(llama_checkpoint, executor):
    """Every prompt-chunk count from one to the whole budget (one-token prompts), beside random
    decode counts and prompt lengths, gets a graph shape with a bucket that holds its chunks."""
    folder, _ = llama_checkpoint
    budget = 96
    llm = LLM(str(folder), dtype="float32", device="cpu", executor=executor, block_size=BLOCK,
              max_num_batched_tokens=budget)  # fmt: skip
    graphs = llm.engine.runner.step_graphs(_eager)
    rng = np.random.default_rng(0)
    blocks = _Blocks()
    for prompts in range(1, budget + 1):
        decodes = 0 if prompts % 4 == 0 else int(rng.integers(0, budget - prompts + 1))
        tokens = int(rng.integers(prompts, budget - decodes + 1))
        cuts = np.sort(rng.choice(np.arange(1, tokens), prompts - 1, replace=False))
        lengths = np.diff([0, *cuts.tolist(), tokens])
        plan = BatchPlan()
        for i in range(decodes):
            seq = blocks.sequence(f"d{i}", [5], extra=1)
            seq.output_token_ids = [7]
            plan.decodes.append(ScheduledChunk(seq, 1, 1))
        for i, length in enumerate(lengths.tolist()):
            seq = blocks.sequence(f"p{i}", [5] * length)
            plan.prefills.append(ScheduledChunk(seq, 0, length))
        step = graphs.prepare(plan)
        assert step is not None, (prompts, decodes, tokens)
        slots = _chunks_in_slots(step)
        assert sum(chunks for chunks, _, _ in slots) >= prompts
        assert all(n == chunk_slots(chunks, rows) for chunks, n, rows in slots)
    assert graphs.stats.eager_steps == 0 and graphs.stats.graph_steps == budget


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@torch.inference_mode()
def test_captured_buckets_replay_the_eager_logits_on_a_gpu(llama_checkpoint):
    """Real CUDA graphs, one pool: a shape of the smallest bucket and one of larger buckets,
    replayed in turn, each after the other rewrote the static tensors they share, give the
    logits of the unpadded eager steps."""
    folder, _ = llama_checkpoint
    llm = LLM(str(folder), dtype="float32", device="cuda", executor="overlapped",
              block_size=BLOCK, max_num_batched_tokens=160, num_kv_blocks=256,
              cuda_graphs=True)  # fmt: skip
    runner = llm.engine.runner
    rng, blocks = np.random.default_rng(3), _Blocks()
    plans = [_random_plans(rng, blocks, n, decodes=5, continued=4) for n in (36, 2)]

    def eager(plan: BatchPlan) -> torch.Tensor:
        step = prepare_step(plan, runner.schedule, runner.buffers, BLOCK, runner.device)
        return runner.forward(step).clone()

    for before, _ in plans:
        eager(before)
    expected = [eager(plan) for _, plan in plans]
    for _ in range(2):
        for (_, plan), logits in zip(plans, expected, strict=True):
            step = runner.graphs.prepare(plan)
            assert step is not None and step.replay is not None
            torch.testing.assert_close(runner.forward(step), logits, rtol=2e-3, atol=2e-3)
    shapes = list(runner.graphs.graphs)  # the start-up shapes (decode-only, full budget) too
    assert runner.graphs.stats.shapes_captured == len(shapes)
    assert {CHUNK_SLOTS, 32} <= {max(shape.chunk_slots) for shape in shapes}
