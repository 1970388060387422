"""Ops: a layer graph's op specs bound to the callables that run them on one nano-batch."""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from nanoflow.runtime.graph import LayerGraph, OpSpec, Resource

if TYPE_CHECKING:
    from nanoflow.runtime.batch import NanoBatch, StepBuffers

OpFn = Callable[["StepBuffers", "NanoBatch", "int | None"], None]


@dataclass(frozen=True)
class Op:
    """One kernel (or a short fixed sequence of them) applied to one nano-batch.

    ``fn(buffers, nano_batch, num_sms)`` reads and writes only the nano-batch's rows of the step
    buffers (and the KV cache of its own sequences); ``num_sms`` is its execution unit's SM budget
    (None: the whole GPU).
    """

    spec: OpSpec
    fn: OpFn

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def resource(self) -> Resource:
        return self.spec.resource


def bind(graph: LayerGraph, target: object) -> list[Op]:
    """The graph's ops, each run by ``target``'s method of the op's name."""
    return [Op(spec, getattr(target, spec.name)) for spec in graph.ops]


def graph_of(ops: list[Op]) -> LayerGraph:
    return _graph(tuple(op.spec for op in ops))


@functools.cache
def _graph(specs: tuple[OpSpec, ...]) -> LayerGraph:
    return LayerGraph(specs)
