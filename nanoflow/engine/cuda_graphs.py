"""CUDA graphs of whole iterations (embedding and every layer's pipeline), one per padded shape.

Launching a layer's ops from Python costs more host time than many of them take on the GPU, and
an overlapped pipeline launches each op once per nano-batch. What an iteration launches depends
only on its shape: each nano-batch's decode rows, prefill rows and prompt chunk slots, and which
nano-batches wait for another's KV write. Rounding the decode count up to a multiple of
``DECODE_ROUND``, the prefill tokens to one of ``PREFILL_ROUND`` and each nano-batch's chunk
count to a bucket (``nanoflow.runtime.static_step.chunk_slots``, with one for every chunk count
the rows can hold, so no plan that fits the rows runs eagerly for its chunks) leaves few shapes;
each is captured once (its pipeline with all streams and events) and replayed, and the host only
writes the step's ids, positions, cache slots and attention metadata into static buffers
(``nanoflow.runtime.static_step``).

Padding rows are token 0 at position 0 and write their K/V to a scratch block no sequence owns;
padded decode rows attend to that one token, padded prefill rows belong to no chunk. The kernels
size their grids from these padded shapes, never from the data.
"""

from __future__ import annotations

import itertools
import logging
import time
from dataclasses import asdict, dataclass
from typing import NamedTuple

import numpy as np
import torch

from nanoflow.engine.batch import PreparedStep, RowLayout, lay_out
from nanoflow.engine.sampling_params import SamplingParams
from nanoflow.engine.scheduler import BatchPlan, ScheduledChunk
from nanoflow.engine.sequence import Sequence
from nanoflow.engine.upload import copy_to, to_device
from nanoflow.runtime.batch import NanoBatch, StepBuffers
from nanoflow.runtime.schedule import PipelineSchedule, split_counts
from nanoflow.runtime.static_step import Capture, Run, StaticStep, chunk_slots, slot_ranges

logger = logging.getLogger(__name__)

DECODE_ROUND = 16
PREFILL_ROUND = 64
MAX_GRAPHS = 256
# rows the step buffers need beyond the token budget, for the rounding up
PADDING_ROWS = DECODE_ROUND + PREFILL_ROUND


class ShapeKey(NamedTuple):
    """What a captured step's launches depend on, per nano-batch of its layout."""

    decode_rows: tuple[int, ...]
    prefill_rows: tuple[int, ...]
    kv_deps: tuple[tuple[int, ...], ...]
    chunk_slots: tuple[int, ...]


@dataclass
class GraphStats:
    """What the graphs did over a run: a throughput figure includes the capture time."""

    shapes_captured: int = 0
    capture_seconds: float = 0.0
    graph_steps: int = 0
    eager_steps: int = 0

    def summary(self) -> dict[str, float]:
        return asdict(self)


def _write_tables(
    tables: np.ndarray, lens: np.ndarray, first_row: int, chunks: list[ScheduledChunk]
) -> int:
    """Each chunk's block table and context length into rows ``first_row`` on, in one numpy
    scatter (a row-by-row copy from Python lists cost more host time than the GPU spends on
    a decode step's attention); returns the longest table's length (0 for no chunks)."""
    if not chunks:
        return 0
    block_tables = [c.seq.block_table for c in chunks]
    counts = np.fromiter(map(len, block_tables), dtype=np.int64, count=len(chunks))
    flat = np.fromiter(itertools.chain.from_iterable(block_tables), dtype=tables.dtype)
    # element i of ``flat`` goes to row r, column i - (start of r in flat)
    offsets = np.arange(first_row, first_row + len(chunks)) * tables.shape[1]
    offsets -= np.cumsum(counts) - counts
    tables.reshape(-1)[np.repeat(offsets, counts) + np.arange(len(flat))] = flat
    lens[first_row : first_row + len(chunks)] = [c.start + c.num_tokens for c in chunks]
    return int(counts.max())


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def _scratch_plan(decodes: int, prefill: int, scratch_block: int, block_size: int) -> BatchPlan:
    """``decodes`` stand-in decodes of one token each and one stand-in prompt chunk of
    ``prefill`` tokens, every K/V and context of them in the scratch block."""
    plan = BatchPlan()
    for i in range(decodes):
        seq = Sequence(f"graph-capture-{i}", [0], SamplingParams(max_tokens=2))
        seq.output_token_ids = [0]
        seq.num_computed_tokens = 1
        seq.block_table = [scratch_block, scratch_block]  # position 1, whatever the block size
        plan.decodes.append(ScheduledChunk(seq, 1, 1))
    if prefill:
        seq = Sequence("graph-capture-prompt", [0] * prefill, SamplingParams(max_tokens=1))
        seq.block_table = [scratch_block] * -(-prefill // block_size)
        plan.prefills.append(ScheduledChunk(seq, 0, prefill))
    return plan


class StepGraphs:
    """Lays steps out in padded shapes and replays one captured graph per shape; ``prepare``
    returns None for a plan no graph can take (more rows than the buffers, too long a block
    table, or the graph count is at its cap), which then runs eagerly. Shapes with more chunk
    slots than the smallest bucket are captured when a step first needs them: which buckets a
    run reaches depends on its prompt lengths, and capturing all of them up front would multiply
    the start-up captures by the bucket count."""

    def __init__(
        self,
        model,
        executor,
        buffers: StepBuffers,
        schedule: PipelineSchedule,
        block_size: int,
        max_blocks_per_seq: int,
        scratch_block: int,
        capture: Capture,
    ) -> None:
        self.model, self.executor, self.buffers = model, executor, buffers
        self.schedule = schedule
        self.block_size = block_size
        self.width = max_blocks_per_seq
        self.scratch_block = scratch_block
        self.capture = capture
        self.stats = GraphStats()
        self._cap_reported = False
        self.graphs: dict[ShapeKey, Run] = {}
        self._nano_batches: dict[ShapeKey, list[NanoBatch]] = {}
        self.rows = buffers.hidden.shape[0]
        self.static = StaticStep(
            self.rows, self.width, schedule.num_nano_batches, scratch_block, buffers.hidden.device
        )

    def shape_of(self, plan: BatchPlan) -> tuple[list[int], list[int]] | None:
        """Decode and prefill rows of each nano-batch for the plan, rounded up; None when the
        padded step does not fit the buffers."""
        decodes = _round_up(len(plan.decodes), DECODE_ROUND)
        prefill = _round_up(plan.num_prefill_tokens, PREFILL_ROUND)
        if decodes + prefill > self.rows:
            return None
        return (
            split_counts(decodes, self.schedule.decode_shares),
            split_counts(prefill, self.schedule.prefill_shares),
        )

    def capture_startup_shapes(self, max_decodes: int, budget: int) -> int:
        """Capture now the shapes most iterations take, so the first iterations of a run, and a
        server's first requests, do not wait for a capture: every decode-only batch of up to
        ``max_decodes`` sequences (smallest first), then every decode count beside the prompt
        tokens that fill the rest of the ``budget`` (a decode count rounded up to its shape
        leaves one of two prompt-token roundings). Stops at the graph cap; returns how many
        shapes were captured."""
        before = self.stats.shapes_captured
        largest = min(_round_up(max_decodes, DECODE_ROUND), self.rows)
        counts = range(DECODE_ROUND, largest + 1, DECODE_ROUND)
        plans = [(d, 0) for d in counts]
        for d in (0, *counts):
            plans += [(d, p) for p in (budget - d, budget - d + DECODE_ROUND - 1) if p > 0]
        seen = set()
        for decodes, prefill in plans:
            plan = _scratch_plan(decodes, prefill, self.scratch_block, self.block_size)
            shape = self.shape_of(plan)
            if shape is None or (key := tuple(map(tuple, shape))) in seen:
                continue
            seen.add(key)
            if len(self.graphs) >= MAX_GRAPHS:
                break
            step = self._prepare(plan)
            if step is not None:  # None: the stand-in prompt's block table is too long
                step.replay()
        return self.stats.shapes_captured - before

    def prepare(self, plan: BatchPlan) -> PreparedStep | None:
        step = self._prepare(plan)
        if step is None:
            self.stats.eager_steps += 1
        else:
            self.stats.graph_steps += 1
        return step

    def _prepare(self, plan: BatchPlan) -> PreparedStep | None:
        shape = self.shape_of(plan)
        if shape is None or any(len(c.seq.block_table) > self.width for c in plan.chunks):
            return None
        pad_slot = self.scratch_block * self.block_size
        layout = lay_out(plan, *shape, self.block_size, pad_slot)
        batches = layout.nano_batches
        key = ShapeKey(
            tuple(shape[0]),
            tuple(shape[1]),
            tuple(r.kv_deps for r in batches),
            tuple(chunk_slots(len(r.pieces), r.prefill_rows) for r in batches),
        )
        if key not in self.graphs and len(self.graphs) >= MAX_GRAPHS:
            if not self._cap_reported:
                self._cap_reported = True
                logger.warning("%d CUDA graphs captured; new shapes run eagerly", MAX_GRAPHS)
            return None
        self._upload(layout, key.chunk_slots)
        n = len(layout.input_ids)
        st = self.static
        device = st.ids.device
        return PreparedStep(
            input_ids=st.ids[:n],
            nano_batches=self._static_nano_batches(key, layout),
            sample_rows=to_device(layout.sample_rows, torch.int64, device),
            sampling_chunks=layout.sampling_chunks,
            num_tokens=n,
            placeholder_rows=layout.placeholder_rows,
            replay=self._replay(key, n),
        )

    def _upload(self, layout: RowLayout, slots: tuple[int, ...]) -> None:
        """Write the step's rows and attention metadata into the static device buffers, each
        nano-batch's prompt chunks into its ``slots`` chunk slots."""
        st = self.static
        n = len(layout.input_ids)
        for dst, values in (
            (st.ids, layout.input_ids),
            (self.buffers.positions, layout.positions),
            (self.buffers.slot_mapping, layout.slots),
        ):  # numpy builds an array from a list several times faster than torch.tensor
            copy_to(dst[:n], torch.from_numpy(np.array(values, dtype=np.int64)))
        tables, lens = st.host_decode_tables.numpy(), st.host_decode_lens.numpy()
        p_tables, p_lens = st.host_prefill_tables.numpy(), st.host_prefill_lens.numpy()
        p_cu = st.host_prefill_cu.numpy()
        decode_rows, width = 0, 1
        ranges = slot_ranges(slots)
        for rows, (chunks, offsets) in zip(layout.nano_batches, ranges, strict=True):
            real = decode_rows + len(rows.decodes)
            width = max(width, _write_tables(tables, lens, decode_rows, rows.decodes))
            tables[real : decode_rows + rows.decode_rows, 0] = self.scratch_block
            lens[real : decode_rows + rows.decode_rows] = 1
            decode_rows += rows.decode_rows
            p_lens[chunks] = 0
            width = max(width, _write_tables(p_tables, p_lens, chunks.start, rows.pieces))
            cu = p_cu[offsets]
            ends = np.cumsum([c.num_tokens for c in rows.pieces], dtype=np.int64)
            cu[0] = 0
            cu[1 : len(ends) + 1] = ends
            cu[len(ends) + 1 :] = ends[-1] if len(ends) else 0
        # only the columns some table reaches: a kernel never reads past a sequence's length
        used, slots_used = slice(0, decode_rows), slice(0, sum(slots))
        offsets_used = slice(0, sum(slots) + len(slots))
        copy_to(st.decode_tables[used, :width], st.host_decode_tables[used, :width])
        copy_to(st.decode_lens[used], st.host_decode_lens[used])
        copy_to(st.prefill_tables[slots_used, :width], st.host_prefill_tables[slots_used, :width])
        copy_to(st.prefill_lens[slots_used], st.host_prefill_lens[slots_used])
        copy_to(st.prefill_cu[offsets_used], st.host_prefill_cu[offsets_used])

    def _static_nano_batches(self, key: ShapeKey, layout: RowLayout) -> list[NanoBatch]:
        """The shape's nano-batches (the same objects every step, as the captured graph reads
        them)."""
        if key not in self._nano_batches:
            spans, slots = layout.nano_batches, key.chunk_slots
            self._nano_batches[key] = self.static.nano_batches(spans, slots)
        return self._nano_batches[key]

    def _replay(self, key: ShapeKey, num_rows: int) -> Run:
        """The shape's graph, captured on first use (capturing runs the step once eagerly, and
        replaying then runs it again: the same K/V land in the same slots, so that is harmless)."""
        if key in self.graphs:
            return self.graphs[key]
        nano_batches, ids = self._nano_batches[key], self.static.ids[:num_rows]

        def run() -> None:
            self.model.embed(ids, self.buffers)
            self.executor.run(self.model.layer_ops, self.buffers, nano_batches)

        def capture_then_replay() -> None:
            if key not in self.graphs:  # a step may be run more than once (benchmarks do)
                started = time.perf_counter()
                self.graphs[key] = self.capture(run)
                self.stats.shapes_captured += 1
                self.stats.capture_seconds += time.perf_counter() - started
            self.graphs[key]()

        return capture_then_replay
