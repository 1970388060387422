"""Ops: the unit of work the pipeline schedules. A decoder layer is a list of them, each tagged with
the GPU resource it is bound by, so the executor can run different classes side by side."""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from nanoflow.runtime.batch import NanoBatch, StepBuffers


class Resource(enum.StrEnum):
    COMPUTE = "compute"
    MEMORY = "memory"
    NETWORK = "network"


OpFn = Callable[["StepBuffers", "NanoBatch", "int | None"], None]


@dataclass(frozen=True)
class Op:
    """One kernel (or a short fixed sequence of them) applied to one nano-batch.

    ``fn(buffers, nano_batch, num_sms)`` reads and writes only the nano-batch's rows of the step
    buffers (and the KV cache of its own sequences); ``num_sms`` is its execution unit's SM budget
    (None: the whole GPU). ``reads_other_kv`` marks ops that also read K/V that earlier
    nano-batches wrote (a prompt chunk cut by a nano-batch boundary). ``after`` names the ops of
    the same layer and nano-batch it needs (default: the op before it), so independent ops, such
    as decode and prefill attention, need not wait for each other.
    """

    name: str
    resource: Resource
    fn: OpFn
    reads_other_kv: bool = False
    writes_kv: bool = False
    after: tuple[str, ...] | None = None


def op_dependencies(names: list[str], after: list[tuple[str, ...] | None]) -> list[tuple[int, ...]]:
    """Indices of the ops each op of a layer waits for (within one nano-batch). Every dependency
    must come earlier in the list, so the list order is always a valid launch order."""
    deps: list[tuple[int, ...]] = []
    for k, wanted in enumerate(after):
        if wanted is None:
            deps.append((k - 1,) if k else ())
            continue
        missing = [w for w in wanted if w not in names[:k]]
        if missing:
            raise ValueError(f"op {names[k]!r} waits for {missing}, which do not come before it")
        deps.append(tuple(names.index(w) for w in wanted))
    return deps


def head_length(names: list[str]) -> int:
    """How many of a layer's ops come up to and including decode attention: the stretch the
    alternating launch order queues before another nano-batch's tail (all of them without
    decode attention)."""
    return names.index("decode_attention") + 1 if "decode_attention" in names else len(names)
