"""Turn a BatchPlan into device inputs laid out by nano-batch.

Rows are ordered nano-batch by nano-batch, each holding its decode tokens then its prefill tokens,
so every op of a nano-batch works on one contiguous slice of the step buffers.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from nanoflow.engine.scheduler import BatchPlan, ScheduledChunk
from nanoflow.engine.sequence import PLACEHOLDER
from nanoflow.models.spec import ModelSpec
from nanoflow.pipeline.schedule import PipelineSchedule, split_counts


@dataclass
class AttentionChunks:
    """Attention metadata for a run of sequences (decodes, or prompt pieces) of one nano-batch."""

    block_tables: torch.Tensor  # [n, max_blocks] int32
    context_lens: torch.Tensor  # [n] int32, K/V tokens each attends to (itself included)
    cu_q_lens: torch.Tensor  # [n + 1] int32, query offsets inside the run
    max_q_len: int


@dataclass
class NanoBatch:
    index: int
    start: int
    end: int
    num_decode: int
    decode: AttentionChunks | None
    prefill: AttentionChunks | None
    kv_deps: tuple[int, ...]

    @property
    def num_tokens(self) -> int:
        return self.end - self.start


@dataclass
class StepBuffers:
    """Activations of one iteration, shared by all layers; each op touches its nano-batch's rows."""

    hidden: torch.Tensor
    residual: torch.Tensor
    normed: torch.Tensor
    qkv: torch.Tensor
    attn: torch.Tensor
    gate_up: torch.Tensor
    act: torch.Tensor
    positions: torch.Tensor
    slot_mapping: torch.Tensor

    @classmethod
    def allocate(
        cls,
        spec: ModelSpec,
        max_tokens: int,
        device: torch.device,
        dtype: torch.dtype,
        tp_size: int = 1,
    ) -> StepBuffers:
        def empty(width: int) -> torch.Tensor:
            return torch.empty(max_tokens, width, device=device, dtype=dtype)

        q, kv, inter = spec.q_size // tp_size, spec.kv_size // tp_size, spec.intermediate_size
        return cls(
            hidden=empty(spec.hidden_size),
            residual=empty(spec.hidden_size),
            normed=empty(spec.hidden_size),
            qkv=empty(q + 2 * kv),
            attn=empty(q),
            gate_up=empty(2 * inter // tp_size),
            act=empty(inter // tp_size),
            positions=torch.empty(max_tokens, device=device, dtype=torch.int64),
            slot_mapping=torch.empty(max_tokens, device=device, dtype=torch.int64),
        )


@dataclass
class PreparedStep:
    input_ids: torch.Tensor
    nano_batches: list[NanoBatch]
    sample_rows: torch.Tensor  # row of each sampling chunk's last token, in plan.chunks order
    sampling_chunks: list[ScheduledChunk]
    num_tokens: int
    placeholder_rows: list[tuple[int, str]]  # (row, request) whose input is still on the GPU


def _pieces(prefills: list[ScheduledChunk], counts: list[int]) -> list[list[ScheduledChunk]]:
    """Cut the concatenated prefill tokens into consecutive runs of ``counts`` tokens."""
    out: list[list[ScheduledChunk]] = []
    queue = list(prefills)
    for count in counts:
        group: list[ScheduledChunk] = []
        while count > 0:
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


def _attention_chunks(chunks: list[ScheduledChunk], device: torch.device) -> AttentionChunks | None:
    if not chunks:
        return None
    width = max(len(c.seq.block_table) for c in chunks)
    tables = [c.seq.block_table + [0] * (width - len(c.seq.block_table)) for c in chunks]
    cu = [0]
    for c in chunks:
        cu.append(cu[-1] + c.num_tokens)

    def tensor(values: list) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.int32).to(device, non_blocking=True)

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
    """Lay the plan's tokens out by nano-batch and upload ids, positions and cache slots."""
    decode_counts = split_counts(len(plan.decodes), schedule.decode_shares)
    prefill_groups = _pieces(
        plan.prefills, split_counts(plan.num_prefill_tokens, schedule.prefill_shares)
    )
    input_ids: list[int] = []
    positions: list[int] = []
    slots: list[int] = []
    last_row: dict[str, int] = {}
    placeholders: list[tuple[int, str]] = []
    seen_in: dict[str, set[int]] = {}
    nano_batches: list[NanoBatch] = []
    decode_offset = 0
    for n_dec, pieces in zip(decode_counts, prefill_groups, strict=True):
        decodes = plan.decodes[decode_offset : decode_offset + n_dec]
        decode_offset += n_dec
        if not decodes and not pieces:
            continue
        start = len(input_ids)
        deps: set[int] = set()
        for chunk in decodes + pieces:
            seq = chunk.seq
            end = chunk.start + chunk.num_tokens
            table = seq.block_table
            input_ids.extend(seq.token_slice(chunk.start, end))
            positions.extend(range(chunk.start, end))
            slots.extend(
                table[p // block_size] * block_size + p % block_size
                for p in range(chunk.start, end)
            )
            last_row[seq.request_id] = len(input_ids) - 1
            if input_ids[-1] == PLACEHOLDER:
                placeholders.append((len(input_ids) - 1, seq.request_id))
                input_ids[-1] = 0
            owners = seen_in.setdefault(seq.request_id, set())
            deps |= owners
            owners.add(len(nano_batches))
        nano_batches.append(
            NanoBatch(
                index=len(nano_batches),
                start=start,
                end=len(input_ids),
                num_decode=len(decodes),
                decode=_attention_chunks(decodes, device),
                prefill=_attention_chunks(pieces, device),
                kv_deps=tuple(sorted(deps)),
            )
        )
    n = len(input_ids)
    buffers.positions[:n].copy_(torch.tensor(positions, dtype=torch.int64), non_blocking=True)
    buffers.slot_mapping[:n].copy_(torch.tensor(slots, dtype=torch.int64), non_blocking=True)
    sampling = [c for c in plan.chunks if c.samples]
    rows = [last_row[c.seq.request_id] for c in sampling]
    return PreparedStep(
        input_ids=torch.tensor(input_ids, dtype=torch.int64).to(device, non_blocking=True),
        nano_batches=nano_batches,
        sample_rows=torch.tensor(rows, dtype=torch.int64).to(device, non_blocking=True),
        sampling_chunks=sampling,
        num_tokens=n,
        placeholder_rows=placeholders,
    )
