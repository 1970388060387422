"""What every op of an iteration consumes: the step's activation buffers and the nano-batch views
of them, with the attention metadata of each nano-batch's decodes and prompt pieces."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch


class LayerWidths(Protocol):
    """The sizes the step buffers are cut to (a model spec has them)."""

    hidden_size: int
    intermediate_size: int

    @property
    def q_size(self) -> int: ...

    @property
    def kv_size(self) -> int: ...


@dataclass
class AttentionChunks:
    """Attention metadata for a run of sequences (decodes, or prompt pieces) of one nano-batch."""

    block_tables: torch.Tensor  # [n, max_blocks] int32
    context_lens: torch.Tensor  # [n] int32, K/V tokens each attends to (itself included)
    cu_q_lens: torch.Tensor  # [n + 1] int32, query offsets inside the run
    max_q_len: int


@dataclass
class NanoBatch:
    """Rows ``start:end`` of the step buffers: ``num_decode`` decode rows, then prompt rows.
    ``kv_deps``: the earlier nano-batches whose K/V writes its attention reads."""

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
class QuantizedRows:
    """An activation as e4m3 rows and one fp32 scale per row, for the FP8 GEMM that reads it."""

    data: torch.Tensor
    scale: torch.Tensor

    @classmethod
    def empty(cls, rows: int, width: int, device: torch.device) -> QuantizedRows:
        return cls(
            torch.zeros(rows, width, device=device, dtype=torch.float8_e4m3fn),
            torch.ones(rows, device=device, dtype=torch.float32),
        )


@dataclass
class StepBuffers:
    """Activations of one iteration, shared by all layers; each op touches its nano-batch's rows.
    With FP8 GEMMs the activations they read also have e4m3 copies, written by the ops that
    produce them (norms, SiLU-mul, the O projection's quantizing pass)."""

    hidden: torch.Tensor
    residual: torch.Tensor
    normed: torch.Tensor
    qkv: torch.Tensor
    attn: torch.Tensor
    gate_up: torch.Tensor
    act: torch.Tensor
    positions: torch.Tensor
    slot_mapping: torch.Tensor
    normed_q: QuantizedRows | None = None
    attn_q: QuantizedRows | None = None
    act_q: QuantizedRows | None = None

    @classmethod
    def allocate(
        cls,
        spec: LayerWidths,
        max_tokens: int,
        device: torch.device,
        dtype: torch.dtype,
        tp_size: int = 1,
        fp8_activations: bool = False,
    ) -> StepBuffers:
        def empty(width: int) -> torch.Tensor:
            return torch.empty(max_tokens, width, device=device, dtype=dtype)

        def quantized(width: int) -> QuantizedRows | None:
            return QuantizedRows.empty(max_tokens, width, device) if fp8_activations else None

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
            normed_q=quantized(spec.hidden_size),
            attn_q=quantized(q),
            act_q=quantized(inter // tp_size),
        )
