"""The static tensors a captured iteration reads, the nano-batch views of them, and the chunk-slot
buckets of each nano-batch's prefill attention."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from nanoflow.runtime.static_step import (
    CHUNK_SLOTS,
    SLOT_GROWTH,
    StaticStep,
    chunk_slots,
    slot_ranges,
)


@dataclass
class Span:
    start: int
    decode_rows: int
    prefill_rows: int
    kv_deps: tuple[int, ...] = ()

    @property
    def end(self) -> int:
        return self.start + self.decode_rows + self.prefill_rows


def _step(rows: int = 32, num_nano_batches: int = 2) -> StaticStep:
    return StaticStep(rows, 4, num_nano_batches, scratch_block=9, device=torch.device("cpu"))


def test_nano_batches_view_their_own_rows_and_chunk_slots():
    step = _step()
    first, second = step.nano_batches([Span(0, 3, 5), Span(8, 2, 0, (0,))], [5, 0])
    assert (first.start, first.end, first.num_decode) == (0, 8, 3)
    assert second.prefill is None and second.kv_deps == (0,)
    assert second.decode.block_tables.data_ptr() == step.decode_tables[3].data_ptr()
    assert first.prefill.max_q_len == 5 and first.prefill.block_tables.shape[0] == 5
    step.decode_lens[3] = 7  # the views follow what the host writes before a replay
    assert second.decode.context_lens[0] == 7
    assert (step.decode_tables == 9).all() and step.decode_cu[:4].tolist() == [0, 1, 2, 3]


def test_each_nano_batch_sees_its_own_bucket_of_slots_back_to_back():
    """The prefill kernel reads as many chunks as the bucket has slots (its grid is sized from
    them), so each view is exactly the bucket, its query offsets one longer."""
    step = _step(rows=160)
    spans = [Span(0, 16, 64), Span(80, 0, 64, (0,))]
    first, second = step.nano_batches(spans, [CHUNK_SLOTS, 32])
    assert first.prefill.block_tables.shape[0] == CHUNK_SLOTS
    assert first.prefill.cu_q_lens.shape[0] == CHUNK_SLOTS + 1
    assert second.prefill.block_tables.shape[0] == second.prefill.context_lens.shape[0] == 32
    assert second.prefill.cu_q_lens.shape[0] == 33
    assert second.prefill.block_tables.data_ptr() == step.prefill_tables[CHUNK_SLOTS].data_ptr()
    assert second.prefill.cu_q_lens.data_ptr() == step.prefill_cu[CHUNK_SLOTS + 1].data_ptr()


def test_nano_batches_refuse_more_slots_than_prefill_rows():
    with pytest.raises(ValueError, match="chunk-slot"):
        _step().nano_batches([Span(0, 0, 4)], [CHUNK_SLOTS])
    with pytest.raises(ValueError, match="chunk-slot"):
        _step().nano_batches([Span(0, 0, 4)], [])


@pytest.mark.parametrize(
    ("chunks", "prefill_rows", "slots"),
    [
        (0, 0, 0),  # no prompt rows, no slots
        (0, 64, CHUNK_SLOTS),  # padding only: the smallest bucket, all empty
        (1, 64, CHUNK_SLOTS),
        (CHUNK_SLOTS, 64, CHUNK_SLOTS),
        (CHUNK_SLOTS + 1, 1000, CHUNK_SLOTS * SLOT_GROWTH),
        (32, 1000, 32),
        (33, 1000, 128),
        (128, 1000, 128),
        (129, 1000, 512),
        (513, 2048, 2048),
        (2048, 2048, 2048),  # a budget of one-token prompts
        (3, 5, 5),  # never more slots than rows
        (33, 64, 64),
        (64, 64, 64),
    ],
)
def test_chunk_slots_at_the_bucket_edges(chunks, prefill_rows, slots):
    assert chunk_slots(chunks, prefill_rows) == slots


@pytest.mark.parametrize(("chunks", "prefill_rows"), [(5, 4), (-1, 4), (1, 0)])
def test_chunk_slots_refuse_more_chunks_than_rows(chunks, prefill_rows):
    with pytest.raises(ValueError, match="cannot fill"):
        chunk_slots(chunks, prefill_rows)


def test_every_chunk_count_the_rows_can_hold_has_a_bucket():
    """A chunk has a token, so a nano-batch of N prefill rows holds 0 to N chunks: each gets a
    bucket that holds it, fits the rows and wastes less than the growth factor, from a short
    ladder."""
    ladder = set()
    for rows in range(600):
        for chunks in range(rows + 1):
            slots = chunk_slots(chunks, rows)
            assert chunks <= slots <= rows
            assert slots <= max(CHUNK_SLOTS, SLOT_GROWTH * (chunks - 1))
            if slots < rows:
                ladder.add(slots)
    assert sorted(ladder) == [8, 32, 128, 512]


def test_slot_ranges_lay_buckets_back_to_back_within_the_rows():
    assert slot_ranges([8, 0, 32]) == [
        (slice(0, 8), slice(0, 9)),
        (slice(8, 8), slice(9, 10)),
        (slice(8, 40), slice(10, 43)),
    ]
    step = _step(rows=96, num_nano_batches=3)
    chunks, offsets = slot_ranges([32, 32, 32])[-1]  # every row a chunk of its own
    assert chunks.stop <= step.prefill_lens.shape[0] and offsets.stop <= step.prefill_cu.shape[0]
