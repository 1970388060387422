"""What a captured iteration reads on every replay: static device tensors for the step's token ids
and each nano-batch's attention metadata, the nano-batch views of them, and the capture itself.

A graph replays the same kernels on the same addresses, so the host rewrites these tensors in
place each step and the views stay the same objects. Each nano-batch's prefill attention has a
bucket of chunk slots (``chunk_slots``), part of the graph's shape; unused slots hold no queries.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol

import torch

from nanoflow.runtime.batch import AttentionChunks, NanoBatch

CHUNK_SLOTS = 8  # the smallest bucket
SLOT_GROWTH = 4

Run = Callable[[], None]
Capture = Callable[[Run], Run]


class RowSpan(Protocol):
    """One nano-batch's rows in a padded step: its decode rows, then its prefill rows."""

    start: int
    decode_rows: int
    prefill_rows: int
    kv_deps: tuple[int, ...]

    @property
    def end(self) -> int: ...


def chunk_slots(chunks: int, prefill_rows: int) -> int:
    """Chunk slots for a nano-batch of ``chunks`` prompt chunks in ``prefill_rows`` rows: the
    smallest ``CHUNK_SLOTS * SLOT_GROWTH**k`` that holds them, never more than ``prefill_rows``.

    The prefill kernel's grid grows with the slot count, so one size for every step would make
    short-prompt steps launch mostly empty work, and a size per chunk count would capture a graph
    per count. Growing by 4 keeps a slot count under four times the chunks while a 2048-token
    nano-batch has five buckets (8 to 2048), each captured only when a step first needs it. A
    chunk has at least one token, so ``prefill_rows`` slots always suffice: every plan that fits
    the rows has a bucket, and a step's slots together never outnumber its rows."""
    if not 0 <= chunks <= prefill_rows:
        raise ValueError(f"{chunks} prompt chunks cannot fill {prefill_rows} prefill rows")
    slots = CHUNK_SLOTS
    while slots < chunks:
        slots *= SLOT_GROWTH
    return min(slots, prefill_rows)


def slot_ranges(slots: Sequence[int]) -> list[tuple[slice, slice]]:
    """Where each nano-batch's chunk slots and their ``slots + 1`` query offsets lie in the
    static tensors: back to back, so a step uploads one prefix of each."""
    out, first = [], 0
    for i, count in enumerate(slots):
        out.append((slice(first, first + count), slice(first + i, first + i + count + 1)))
        first += count
    return out


def cuda_capture(pool: object) -> Capture:
    """Capture ``run`` into a CUDA graph (after one eager run that compiles and warms up) sharing
    one memory pool with the other shapes' graphs."""

    def capture(run: Run) -> Run:
        run()
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=pool):
            run()
        return graph.replay

    return capture


class StaticStep:
    """``rows`` token ids and decode rows, as many prompt chunk slots (the most the nano-batches'
    buckets can take together), block tables ``width`` wide; padding attends to
    ``scratch_block``. Host copies of the metadata are the staging area the host fills before
    each upload."""

    def __init__(
        self,
        rows: int,
        width: int,
        num_nano_batches: int,
        scratch_block: int,
        device: torch.device,
    ) -> None:
        def static(*shape: int, fill: int = 0, dtype: torch.dtype = torch.int32) -> torch.Tensor:
            return torch.full(shape, fill, dtype=dtype, device=device)

        self.ids = static(rows, dtype=torch.int64)
        self.decode_tables = static(rows, width, fill=scratch_block)
        self.decode_lens = static(rows, fill=1)
        self.decode_cu = torch.arange(rows + 1, dtype=torch.int32, device=device)
        self.prefill_tables = static(rows, width, fill=scratch_block)
        self.prefill_lens = static(rows)
        self.prefill_cu = static(rows + num_nano_batches)
        self.host_decode_tables = self.decode_tables.cpu()
        self.host_decode_lens = self.decode_lens.cpu()
        self.host_prefill_tables = self.prefill_tables.cpu()
        self.host_prefill_lens = self.prefill_lens.cpu()
        self.host_prefill_cu = self.prefill_cu.cpu()

    def nano_batches(self, spans: Sequence[RowSpan], slots: Sequence[int]) -> list[NanoBatch]:
        """Nano-batches over these tensors: decode rows in order, each nano-batch's prompt
        chunks in its own ``slots`` (as ``slot_ranges`` places them)."""
        if len(slots) != len(spans) or any(
            n > span.prefill_rows for n, span in zip(slots, spans, strict=True)
        ):
            raise ValueError("each nano-batch needs a chunk-slot count of at most its prefill rows")
        out, decode_rows = [], 0
        for i, (span, (chunks, offsets)) in enumerate(zip(spans, slot_ranges(slots), strict=True)):
            decode = prefill = None
            if span.decode_rows:
                rows = slice(decode_rows, decode_rows + span.decode_rows)
                decode = AttentionChunks(
                    self.decode_tables[rows],
                    self.decode_lens[rows],
                    self.decode_cu[: span.decode_rows + 1],
                    max_q_len=1,
                )
                decode_rows += span.decode_rows
            if span.prefill_rows:
                prefill = AttentionChunks(
                    self.prefill_tables[chunks],
                    self.prefill_lens[chunks],
                    self.prefill_cu[offsets],
                    max_q_len=span.prefill_rows,
                )
            out.append(
                NanoBatch(i, span.start, span.end, span.decode_rows, decode, prefill, span.kv_deps)
            )
        return out
