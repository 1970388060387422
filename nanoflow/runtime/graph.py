"""A decoder layer's op graph as data: each op's resource class, the rows it works on, what it
waits for and the KV cache it writes or reads, defined once per architecture.

Models bind it to kernels (``nanoflow.runtime.ops.bind``); the executors, the cost model, the
roofline, the profiler and the search all read the same graph, so the pipeline that is tuned is
the pipeline that runs.
"""

from __future__ import annotations

import enum
import functools
from collections.abc import Collection, Hashable, Sequence
from dataclasses import dataclass


class Resource(enum.StrEnum):
    COMPUTE = "compute"
    MEMORY = "memory"
    NETWORK = "network"


class Rows(enum.StrEnum):
    """Which of a nano-batch's rows an op works on (an op with none of them there is a no-op)."""

    ALL = "all"
    DECODE = "decode"
    PREFILL = "prefill"


DECODE_ATTENTION = "decode_attention"
PREFILL_ATTENTION = "prefill_attention"


@dataclass(frozen=True)
class OpSpec:
    """One op of a layer. ``after`` names the ops of the same layer and nano-batch it needs
    (None: the op before it), so independent ops, such as decode and prefill attention, need
    not wait for each other. ``reads_other_kv``: it also reads K/V that earlier nano-batches
    wrote (a prompt cut by a nano-batch boundary). ``ends_head``: the alternating launch order
    queues a nano-batch's ops up to this one before another nano-batch's tail."""

    name: str
    resource: Resource
    rows: Rows = Rows.ALL
    after: tuple[str, ...] | None = None
    writes_kv: bool = False
    reads_other_kv: bool = False
    ends_head: bool = False


@dataclass(frozen=True)
class LayerGraph:
    """A layer's ops in a valid launch order (every dependency comes earlier)."""

    ops: tuple[OpSpec, ...]

    def __post_init__(self) -> None:
        names = self.names
        for k, op in enumerate(self.ops):
            missing = [w for w in op.after or () if w not in names[:k]]
            if missing:
                raise ValueError(f"op {op.name!r} waits for {missing}, which do not come before it")

    @property
    def names(self) -> list[str]:
        return [op.name for op in self.ops]

    @functools.cached_property
    def deps(self) -> tuple[tuple[int, ...], ...]:
        """Indices of the ops each op waits for within one nano-batch."""
        names = self.names
        return tuple(
            ((k - 1,) if k else ()) if op.after is None else tuple(names.index(w) for w in op.after)
            for k, op in enumerate(self.ops)
        )

    @functools.cached_property
    def kv_op(self) -> int | None:
        """The op that writes this layer's K/V."""
        return next((k for k, op in enumerate(self.ops) if op.writes_kv), None)

    @functools.cached_property
    def head(self) -> int:
        """How many ops the head holds: up to the op that ends it, else the whole layer."""
        ends = [k for k, op in enumerate(self.ops) if op.ends_head]
        return ends[-1] + 1 if ends else len(self.ops)

    def waits(
        self, layer: int, k: int, j: int, kv_deps: Sequence[int], previous: LayerGraph | None
    ) -> list[tuple[int, int, int]]:
        """The (layer, op index, nano-batch) launches that op ``k`` of nano-batch ``j`` waits
        for: its own earlier ops, else the last op of the previous layer (whose graph is
        ``previous``), and the KV writes of the earlier nano-batches ``kv_deps`` whose keys it
        reads. The one dependency rule of the pipeline: the executors and the cost model both
        follow it."""
        needs = [(layer, d, j) for d in self.deps[k]]
        if not needs and previous is not None:
            needs.append((layer - 1, len(previous.ops) - 1, j))
        if self.ops[k].reads_other_kv and self.kv_op is not None:
            needs += [(layer, self.kv_op, i) for i in kv_deps]
        return needs

    def names_where(self, resource: Resource, rows: Rows) -> tuple[str, ...]:
        return tuple(op.name for op in self.ops if op.resource is resource and op.rows is rows)


def kv_dependencies(owners: Sequence[Collection[Hashable]]) -> list[tuple[int, ...]]:
    """For each nano-batch, the earlier ones holding prompt tokens of the same sequences (whose
    KV writes its prefill attention reads); ``owners[j]``: the sequences of nano-batch ``j``'s
    prompt tokens."""
    seen: dict[Hashable, set[int]] = {}
    out: list[tuple[int, ...]] = []
    for j, names in enumerate(owners):
        deps: set[int] = set()
        for name in names:
            holders = seen.setdefault(name, set())
            deps |= holders
            holders.add(j)
        out.append(tuple(sorted(deps)))
    return out


_ATTENTION = (
    OpSpec("input_norm", Resource.MEMORY),
    OpSpec("qkv_proj", Resource.COMPUTE),
    OpSpec("rope_kv_write", Resource.MEMORY, writes_kv=True),
    OpSpec(DECODE_ATTENTION, Resource.MEMORY, Rows.DECODE, ends_head=True),
    OpSpec(
        PREFILL_ATTENTION, Resource.COMPUTE, Rows.PREFILL, ("rope_kv_write",), reads_other_kv=True
    ),
    OpSpec("o_proj", Resource.COMPUTE, after=(DECODE_ATTENTION, PREFILL_ATTENTION)),
)
_DENSE_MLP = (
    OpSpec("post_attn_norm", Resource.MEMORY),
    OpSpec("gate_up_proj", Resource.COMPUTE),
    OpSpec("silu_mul", Resource.MEMORY),
    OpSpec("down_proj", Resource.COMPUTE),
)
_MOE_MLP = (
    OpSpec("post_attn_norm", Resource.MEMORY),
    OpSpec("router", Resource.COMPUTE),
    OpSpec("experts", Resource.COMPUTE),
)


def _layer(mlp: tuple[OpSpec, ...], tensor_parallel: bool) -> LayerGraph:
    """Attention then ``mlp``; with tensor parallelism an all-reduce follows each half."""
    if not tensor_parallel:
        return LayerGraph(_ATTENTION + mlp)
    attn_reduce = OpSpec("attn_all_reduce", Resource.NETWORK)
    mlp_reduce = OpSpec("mlp_all_reduce", Resource.NETWORK)
    return LayerGraph((*_ATTENTION, attn_reduce, *mlp, mlp_reduce))


def llama_graph(tensor_parallel: bool = False) -> LayerGraph:
    """Llama family (Llama 2/3, Mistral, Qwen2): attention, then the dense gated MLP."""
    return _layer(_DENSE_MLP, tensor_parallel)


def mixtral_graph(tensor_parallel: bool = False) -> LayerGraph:
    """Mixtral: Llama's attention, then a router and the fused experts in place of the MLP."""
    return _layer(_MOE_MLP, tensor_parallel)
