"""Turn a BatchPlan into device inputs laid out by nano-batch.

Rows are ordered nano-batch by nano-batch, each holding its decode tokens then its prefill tokens,
so every op of a nano-batch works on one contiguous slice of the step buffers.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from nanoflow.engine.scheduler import BatchPlan, ScheduledChunk
from nanoflow.engine.sequence import PLACEHOLDER, Sequence
from nanoflow.engine.upload import copy_to, to_device
from nanoflow.runtime.batch import AttentionChunks, NanoBatch, StepBuffers
from nanoflow.runtime.graph import kv_dependencies
from nanoflow.runtime.schedule import PipelineSchedule, split_counts

# (row, sequence, position): the row's logits score the sequence's prompt token at ``position``
PromptRow = tuple[int, Sequence, int]


@dataclass
class PreparedStep:
    input_ids: torch.Tensor
    nano_batches: list[NanoBatch]
    sample_rows: torch.Tensor  # row of each sampling chunk's last token, in plan.chunks order
    sampling_chunks: list[ScheduledChunk]
    num_tokens: int
    placeholder_rows: list[tuple[int, str]]  # (row, request) whose input is still on the GPU
    replay: Callable[[], None] | None = None  # a CUDA graph of embed + layers, when one fits
    prompt_rows: list[PromptRow] = field(default_factory=list)  # as RowLayout.prompt_rows


@dataclass
class NanoBatchRows:
    """One nano-batch's rows: its decode part then its prefill part, each possibly padded."""

    start: int
    decode_rows: int
    prefill_rows: int
    decodes: list[ScheduledChunk]
    pieces: list[ScheduledChunk]
    kv_deps: tuple[int, ...] = ()  # as NanoBatch.kv_deps

    @property
    def end(self) -> int:
        return self.start + self.decode_rows + self.prefill_rows


@dataclass
class RowLayout:
    """Host-side rows of a step, nano-batch by nano-batch: what is uploaded and what each
    nano-batch's attention covers."""

    input_ids: list[int]
    positions: list[int]
    slots: list[int]
    nano_batches: list[NanoBatchRows]
    sample_rows: list[int]
    sampling_chunks: list[ScheduledChunk]
    placeholder_rows: list[tuple[int, str]]
    # the rows of prompts whose logprobs are asked, except each prompt's last (it samples)
    prompt_rows: list[PromptRow] = field(default_factory=list)


def _pieces(prefills: list[ScheduledChunk], counts: list[int]) -> list[list[ScheduledChunk]]:
    """Cut the concatenated prefill tokens into consecutive runs of at most ``counts`` tokens
    (the last runs stay short, or empty, when the tokens run out)."""
    out: list[list[ScheduledChunk]] = []
    queue = list(prefills)
    for count in counts:
        group: list[ScheduledChunk] = []
        while count > 0 and queue:
            chunk = queue[0]
            take = min(count, chunk.num_tokens)
            group.append(ScheduledChunk(chunk.seq, chunk.start, take))
            if take == chunk.num_tokens:
                queue.pop(0)
            else:
                queue[0] = ScheduledChunk(chunk.seq, chunk.start + take, chunk.num_tokens - take)
            count -= take
        out.append(group)
    return out


def lay_out(
    plan: BatchPlan,
    decode_rows: list[int],
    prefill_rows: list[int],
    block_size: int,
    pad_slot: int = 0,
) -> RowLayout:
    """Place the plan's tokens in nano-batches of the given decode and prefill row counts,
    filling them in order. Rows left over are padding (token 0 at position 0, writing its K/V to
    ``pad_slot``); a nano-batch of no rows at all is dropped."""
    if len(plan.decodes) > sum(decode_rows) or plan.num_prefill_tokens > sum(prefill_rows):
        raise ValueError("the plan has more tokens than the layout has rows")
    decode_groups, taken = [], 0
    for count in decode_rows:
        decode_groups.append(plan.decodes[taken : taken + count])
        taken += len(decode_groups[-1])
    layout = RowLayout([], [], [], [], [], [c for c in plan.chunks if c.samples], [])
    last_row: dict[str, int] = {}

    def pad(rows: int) -> None:
        layout.input_ids.extend([0] * rows)
        layout.positions.extend([0] * rows)
        layout.slots.extend([pad_slot] * rows)

    def place_decodes(chunks: list[ScheduledChunk], rows: int) -> None:
        """One token each, at its sequence's end: the common case, kept to plain appends (a
        sequence decodes once per plan, so it adds no dependency)."""
        ids, positions, slots = layout.input_ids, layout.positions, layout.slots
        for chunk in chunks:
            seq, p = chunk.seq, chunk.start
            token = seq.token_at(p)
            if token == PLACEHOLDER:
                layout.placeholder_rows.append((len(ids), seq.request_id))
                token = 0
            last_row[seq.request_id] = len(ids)
            ids.append(token)
            positions.append(p)
            slots.append(seq.block_table[p // block_size] * block_size + p % block_size)
        pad(rows - len(chunks))

    def place_pieces(chunks: list[ScheduledChunk], rows: int) -> None:
        for chunk in chunks:
            seq, end = chunk.seq, chunk.start + chunk.num_tokens
            table = seq.block_table
            first_row = len(layout.input_ids) - chunk.start
            layout.prompt_rows.extend(
                (first_row + p, seq, p + 1)
                for p in range(chunk.start, min(end, seq.scored_prompt_len - 1))
            )
            layout.input_ids.extend(seq.token_slice(chunk.start, end))
            layout.positions.extend(range(chunk.start, end))
            layout.slots.extend(
                table[p // block_size] * block_size + p % block_size
                for p in range(chunk.start, end)
            )
            last_row[seq.request_id] = len(layout.input_ids) - 1
            if layout.input_ids[-1] == PLACEHOLDER:
                layout.placeholder_rows.append((len(layout.input_ids) - 1, seq.request_id))
                layout.input_ids[-1] = 0
        pad(rows - sum(c.num_tokens for c in chunks))

    pieces_of = _pieces(plan.prefills, prefill_rows)
    groups = zip(decode_rows, prefill_rows, decode_groups, pieces_of, strict=True)
    for n_dec, n_pre, decodes, pieces in groups:
        if n_dec + n_pre == 0:
            continue
        start = len(layout.input_ids)
        place_decodes(decodes, n_dec)
        place_pieces(pieces, n_pre)
        layout.nano_batches.append(NanoBatchRows(start, n_dec, n_pre, decodes, pieces))
    owners = [[c.seq.request_id for c in rows.pieces] for rows in layout.nano_batches]
    for rows, deps in zip(layout.nano_batches, kv_dependencies(owners), strict=True):
        rows.kv_deps = deps
    layout.sample_rows = [last_row[c.seq.request_id] for c in layout.sampling_chunks]
    return layout


def _attention_chunks(chunks: list[ScheduledChunk], device: torch.device) -> AttentionChunks | None:
    if not chunks:
        return None
    width = max(len(c.seq.block_table) for c in chunks)
    tables = [c.seq.block_table + [0] * (width - len(c.seq.block_table)) for c in chunks]
    cu = [0]
    for c in chunks:
        cu.append(cu[-1] + c.num_tokens)

    def tensor(values: list) -> torch.Tensor:
        return to_device(values, torch.int32, device)

    return AttentionChunks(
        block_tables=tensor(tables),
        context_lens=tensor([c.start + c.num_tokens for c in chunks]),
        cu_q_lens=tensor(cu),
        max_q_len=max(c.num_tokens for c in chunks),
    )


def prepare_step(
    plan: BatchPlan,
    schedule: PipelineSchedule,
    buffers: StepBuffers,
    block_size: int,
    device: torch.device,
) -> PreparedStep:
    """Lay the plan's tokens out by nano-batch, with no padding, and upload ids, positions and
    cache slots."""
    layout = lay_out(
        plan,
        split_counts(len(plan.decodes), schedule.decode_shares),
        split_counts(plan.num_prefill_tokens, schedule.prefill_shares),
        block_size,
    )
    nano_batches = [
        NanoBatch(
            index=i,
            start=rows.start,
            end=rows.end,
            num_decode=rows.decode_rows,
            decode=_attention_chunks(rows.decodes, device),
            prefill=_attention_chunks(rows.pieces, device),
            kv_deps=rows.kv_deps,
        )
        for i, rows in enumerate(layout.nano_batches)
    ]
    n = len(layout.input_ids)
    copy_to(buffers.positions[:n], torch.tensor(layout.positions))
    copy_to(buffers.slot_mapping[:n], torch.tensor(layout.slots))
    return PreparedStep(
        input_ids=to_device(layout.input_ids, torch.int64, device),
        nano_batches=nano_batches,
        sample_rows=to_device(layout.sample_rows, torch.int64, device),
        sampling_chunks=layout.sampling_chunks,
        num_tokens=n,
        placeholder_rows=layout.placeholder_rows,
        prompt_rows=layout.prompt_rows,
    )
