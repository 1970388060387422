"""What a captured iteration reads on every replay: static device tensors for the step's token ids
and each nano-batch's attention metadata, the nano-batch views of them, and the capture itself.

A graph replays the same kernels on the same addresses, so the host rewrites these tensors in
place each step and the views stay the same objects. Each nano-batch's prefill attention has
``CHUNK_SLOTS`` chunk slots; unused ones hold no queries.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol

import torch

from nanoflow.runtime.batch import AttentionChunks, NanoBatch

CHUNK_SLOTS = 8

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
    """``rows`` token ids and decode rows, ``CHUNK_SLOTS`` prompt chunks per nano-batch, block
    tables ``width`` wide; padding attends to ``scratch_block``. Host copies of the metadata
    are the staging area the host fills before each upload."""

    def __init__(
        self,
        rows: int,
        width: int,
        num_nano_batches: int,
        scratch_block: int,
        device: torch.device,
    ) -> None:
        slots = num_nano_batches * CHUNK_SLOTS

        def static(*shape: int, fill: int = 0, dtype: torch.dtype = torch.int32) -> torch.Tensor:
            return torch.full(shape, fill, dtype=dtype, device=device)

        self.ids = static(rows, dtype=torch.int64)
        self.decode_tables = static(rows, width, fill=scratch_block)
        self.decode_lens = static(rows, fill=1)
        self.decode_cu = torch.arange(rows + 1, dtype=torch.int32, device=device)
        self.prefill_tables = static(slots, width, fill=scratch_block)
        self.prefill_lens = static(slots)
        self.prefill_cu = static(num_nano_batches, CHUNK_SLOTS + 1)
        self.host_decode_tables = self.decode_tables.cpu()
        self.host_decode_lens = self.decode_lens.cpu()
        self.host_prefill_tables = self.prefill_tables.cpu()
        self.host_prefill_lens = self.prefill_lens.cpu()
        self.host_prefill_cu = self.prefill_cu.cpu()

    def nano_batches(self, spans: Sequence[RowSpan]) -> list[NanoBatch]:
        """Nano-batches over these tensors: decode rows in order, each nano-batch's prompt
        chunks in its own ``CHUNK_SLOTS`` slots."""
        out, decode_rows = [], 0
        for i, span in enumerate(spans):
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
                slots = slice(i * CHUNK_SLOTS, (i + 1) * CHUNK_SLOTS)
                prefill = AttentionChunks(
                    self.prefill_tables[slots],
                    self.prefill_lens[slots],
                    self.prefill_cu[i],
                    max_q_len=span.prefill_rows,
                )
            out.append(
                NanoBatch(i, span.start, span.end, span.decode_rows, decode, prefill, span.kv_deps)
            )
        return out
