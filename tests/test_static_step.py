"""The static tensors a captured iteration reads, and the nano-batch views of them."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from nanoflow.runtime.static_step import CHUNK_SLOTS, StaticStep


@dataclass
class Span:
    start: int
    decode_rows: int
    prefill_rows: int
    kv_deps: tuple[int, ...] = ()

    @property
    def end(self) -> int:
        return self.start + self.decode_rows + self.prefill_rows


def test_nano_batches_view_their_own_rows_and_chunk_slots():
    step = StaticStep(
        rows=32, width=4, num_nano_batches=2, scratch_block=9, device=torch.device("cpu")
    )
    first, second = step.nano_batches([Span(0, 3, 5), Span(8, 2, 0, (0,))])
    assert (first.start, first.end, first.num_decode) == (0, 8, 3)
    assert second.prefill is None and second.kv_deps == (0,)
    assert second.decode.block_tables.data_ptr() == step.decode_tables[3].data_ptr()
    assert first.prefill.max_q_len == 5 and first.prefill.block_tables.shape[0] == CHUNK_SLOTS
    step.decode_lens[3] = 7  # the views follow what the host writes before a replay
    assert second.decode.context_lens[0] == 7
    assert (step.decode_tables == 9).all() and step.decode_cu[:4].tolist() == [0, 1, 2, 3]
