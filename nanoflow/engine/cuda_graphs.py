"""CUDA graphs for decode-only iterations, one per batch-size bucket.

Launching a layer's ops from Python costs more host time than a small decode batch takes on the
GPU, and an overlapped pipeline launches each op once per nano-batch. A decode-only iteration has
shapes that depend only on its batch size, so it is captured once per bucket of sizes (its pipeline
with all streams and events included) and replayed: the host then only copies the step's inputs
into the graph's static buffers. Rows past the real batch are padding that attends to one token of
a scratch KV block no sequence owns, so they never touch real cache entries.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from nanoflow.engine.batch import AttentionChunks, NanoBatch, PreparedStep, StepBuffers
from nanoflow.engine.scheduler import BatchPlan
from nanoflow.pipeline.schedule import PipelineSchedule, split_counts

Forward = Callable[[], torch.Tensor]
Capture = Callable[[Forward], Forward]

BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 160, 192, 224, 256, 320, 384, 448, 512)


def cuda_capture(pool: object) -> Capture:
    """Capture ``forward`` into a CUDA graph (after one eager run that compiles and warms up)
    sharing one memory pool with the other buckets; the replay returns the graph's output."""

    def capture(forward: Forward) -> Forward:
        forward()
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=pool):
            output = forward()

        def replay() -> torch.Tensor:
            graph.replay()
            return output

        return replay

    return capture


@dataclass
class _Bucket:
    size: int
    input_ids: torch.Tensor
    block_tables: torch.Tensor
    context_lens: torch.Tensor
    replay: Forward


class DecodeGraphs:
    """Replays captured decode iterations; ``eligible`` says which plans it can take."""

    def __init__(
        self,
        model,
        executor,
        buffers: StepBuffers,
        schedule: PipelineSchedule,
        block_size: int,
        max_blocks_per_seq: int,
        scratch_block: int,
        max_batch: int,
        capture: Capture,
    ) -> None:
        self.model, self.executor, self.buffers = model, executor, buffers
        self.schedule = schedule
        self.block_size = block_size
        self.width = max_blocks_per_seq
        self.scratch_block = scratch_block
        self.sizes = [b for b in BUCKETS if b <= max_batch]
        self.capture = capture
        self.buckets: dict[int, _Bucket] = {}
        # Host staging for the block tables, rewritten in place each step rather than rebuilt as
        # Python lists (a table is up to max_batch x max_blocks_per_seq entries). Pageable on
        # purpose: a copy from pageable memory is staged before it returns, so the next step may
        # rewrite these while the GPU is still behind.
        largest = self.sizes[-1] if self.sizes else 0
        self.host_tables = torch.full((largest, self.width), scratch_block, dtype=torch.int32)
        self.host_lens = torch.ones(largest, dtype=torch.int32)

    def eligible(self, plan: BatchPlan) -> bool:
        return (
            not plan.prefills
            and bool(self.sizes)
            and 0 < len(plan.decodes) <= self.sizes[-1]
            and all(len(c.seq.block_table) <= self.width for c in plan.decodes)
        )

    def forward(self, plan: BatchPlan, step: PreparedStep) -> torch.Tensor:
        """Logits of the plan's decodes (rows in plan order, as ``prepare_step`` laid them out)."""
        n = len(plan.decodes)
        bucket = self._bucket(next(size for size in self.sizes if size >= n))
        tables, lens = self.host_tables.numpy(), self.host_lens.numpy()
        tables[: bucket.size].fill(self.scratch_block)
        lens[: bucket.size].fill(1)
        for i, chunk in enumerate(plan.decodes):
            table = chunk.seq.block_table
            tables[i, : len(table)] = table
            lens[i] = chunk.start + 1
        bucket.block_tables.copy_(self.host_tables[: bucket.size], non_blocking=True)
        bucket.context_lens.copy_(self.host_lens[: bucket.size], non_blocking=True)
        bucket.input_ids[:n].copy_(step.input_ids)
        bucket.input_ids[n:].zero_()
        self.buffers.positions[n : bucket.size].zero_()
        self.buffers.slot_mapping[n : bucket.size].fill_(self.scratch_block * self.block_size)
        return bucket.replay()[:n]

    def _bucket(self, size: int) -> _Bucket:
        if size not in self.buckets:
            self.buckets[size] = self._capture(size)
        return self.buckets[size]

    def _capture(self, size: int) -> _Bucket:
        device = self.buffers.hidden.device
        ids = torch.zeros(size, dtype=torch.int64, device=device)
        tables = torch.full((size, self.width), self.scratch_block, dtype=torch.int32,
                            device=device)  # fmt: skip
        lens = torch.ones(size, dtype=torch.int32, device=device)
        rows = torch.arange(size, device=device)
        nano_batches, start = [], 0
        for count in split_counts(size, self.schedule.decode_shares):
            if count == 0:
                continue
            end = start + count
            chunks = AttentionChunks(
                block_tables=tables[start:end],
                context_lens=lens[start:end],
                cu_q_lens=torch.arange(count + 1, dtype=torch.int32, device=device),
                max_q_len=1,
            )
            nano_batches.append(NanoBatch(len(nano_batches), start, end, count, chunks, None, ()))
            start = end

        def forward() -> torch.Tensor:
            self.model.embed(ids, self.buffers)
            self.executor.run(self.model.layer_ops, self.buffers, nano_batches)
            return self.model.logits(self.buffers, rows)

        # Capturing runs the forward (warm-up, capture): point every row at the scratch block
        # meanwhile, and give the step being served its positions and cache slots back after.
        saved = self.buffers.positions[:size].clone(), self.buffers.slot_mapping[:size].clone()
        self.buffers.positions[:size].zero_()
        self.buffers.slot_mapping[:size].fill_(self.scratch_block * self.block_size)
        replay = self.capture(forward)
        self.buffers.positions[:size].copy_(saved[0])
        self.buffers.slot_mapping[:size].copy_(saved[1])
        return _Bucket(size, ids, tables, lens, replay)
