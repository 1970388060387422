"""Executors: run a model's layer ops over an iteration's nano-batches.

* ``SequentialExecutor``: one stream, whole GPU, op after op (the reference and the baseline).
* ``NanoBatchExecutor``: the nano-batches one after another on one stream (the cost of splitting).
* ``OverlappedExecutor``: each op on its execution unit's stream; CUDA events carry the data
  dependencies, so compute, memory and network ops of different nano-batches run at once. No host
  synchronisation happens inside an iteration.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from nanoflow.runtime.batch import NanoBatch, StepBuffers
from nanoflow.runtime.graph import LayerGraph
from nanoflow.runtime.ops import Op, graph_of
from nanoflow.runtime.schedule import LaunchOrder, PipelineSchedule
from nanoflow.runtime.units import ExecutionUnit, build_units

LaunchHook = Callable[[int, Op, NanoBatch, str, bool], None]


def launch_order(num_ops: int, num_nano_batches: int, order: LaunchOrder) -> list[tuple[int, int]]:
    """(op index, nano-batch index) pairs of one layer, in the order they are launched."""
    if order is LaunchOrder.WAVEFRONT:
        waves = num_ops + num_nano_batches - 1
        return [
            (w - j, j)
            for w in range(waves)
            for j in range(num_nano_batches)
            if 0 <= w - j < num_ops
        ]
    return [(k, j) for k in range(num_ops) for j in range(num_nano_batches)]


@functools.lru_cache(maxsize=16)
def iteration_order(
    layers: tuple[tuple[int, int], ...], num_nano_batches: int, order: LaunchOrder
) -> list[tuple[int, int, int]]:
    """(layer, op index, nano-batch index) of a whole iteration in launch order; ``layers``
    gives each layer's op count and where its head ends (``LayerGraph.head``)."""
    if order is not LaunchOrder.ALTERNATING:
        return [
            (layer, k, j)
            for layer, (num_ops, _) in enumerate(layers)
            for k, j in launch_order(num_ops, num_nano_batches, order)
        ]
    launches = []
    for layer in range(len(layers) + 1):
        for j in range(num_nano_batches):
            if layer:
                num_ops, head = layers[layer - 1]
                launches += [(layer - 1, k, j) for k in range(head, num_ops)]
            if layer < len(layers):
                launches += [(layer, k, j) for k in range(layers[layer][1])]
    return launches


@dataclass
class _LayerPlan:
    graph: LayerGraph
    units: list[ExecutionUnit]


class SequentialExecutor:
    name = "sequential"

    def run(
        self, layer_ops: list[list[Op]], buffers: StepBuffers, nano_batches: list[NanoBatch]
    ) -> None:
        for ops in layer_ops:
            for op in ops:
                for nb in nano_batches:
                    op.fn(buffers, nb, None)


class NanoBatchExecutor:
    """Nano-batches without overlap: each layer runs nano-batch after nano-batch."""

    name = "nanobatch"

    def run(
        self, layer_ops: list[list[Op]], buffers: StepBuffers, nano_batches: list[NanoBatch]
    ) -> None:
        for ops in layer_ops:
            for nb in nano_batches:
                for op in ops:
                    op.fn(buffers, nb, None)


class OverlappedExecutor:
    """Operation-level pipeline over execution units (docs/architecture.md, "The pipeline")."""

    name = "overlapped"

    def __init__(self, schedule: PipelineSchedule, device: torch.device) -> None:
        self.schedule = schedule
        self.device = device
        self.units: dict[str, ExecutionUnit] = build_units(schedule, device)
        self.hook: LaunchHook | None = None
        self._events: dict[tuple[int, int, int], torch.cuda.Event] = {}
        self._plans: dict[tuple[str, ...], _LayerPlan] = {}

    def _event(self, op_index: int, nano_batch: int, layer: int = 0) -> torch.cuda.Event:
        """One reusable event per (op, nano-batch, layer parity): its waiters are all enqueued
        before it is recorded again two layers on (the alternating order launches a layer's
        tail after the next layer's head of earlier nano-batches), so reuse never loses a
        dependency."""
        key = (op_index, nano_batch, layer % 2)
        if key not in self._events:
            self._events[key] = torch.cuda.Event()
        return self._events[key]

    def _unit_per_op(self, ops: list[Op]) -> list[ExecutionUnit]:
        return [self.units[self.schedule.unit_of(op.name, op.resource).name] for op in ops]

    def _layer_plan(self, ops: list[Op]) -> _LayerPlan:
        """A layer's graph and units: the same for every layer of a model, so worked out once
        and kept off the per-launch path."""
        key = tuple(op.name for op in ops)
        if key not in self._plans:
            self._plans[key] = _LayerPlan(graph_of(ops), self._unit_per_op(ops))
        return self._plans[key]

    def _waits(
        self, plans: list[_LayerPlan], layer: int, k: int, nb: NanoBatch
    ) -> list[tuple[torch.cuda.Event, Any]]:
        """The events (and their streams) op ``k`` of ``nb`` in ``layer`` waits for, by the
        graph's rule; every stream already waits for the iteration's start."""
        previous = plans[layer - 1].graph if layer else None
        return [
            (self._event(d, i, L), plans[L].units[d].stream)
            for L, d, i in plans[layer].graph.waits(layer, k, nb.index, nb.kv_deps, previous)
        ]

    def run(
        self, layer_ops: list[list[Op]], buffers: StepBuffers, nano_batches: list[NanoBatch]
    ) -> None:
        plans = [self._layer_plan(ops) for ops in layer_ops]
        order = iteration_order(
            tuple((len(p.units), p.graph.head) for p in plans),
            len(nano_batches),
            self.schedule.launch_order,
        )
        if self.device.type != "cuda":  # nothing to overlap: run the launch order itself
            for layer, k, j in order:
                layer_ops[layer][k].fn(buffers, nano_batches[j], plans[layer].units[k].num_sms)
            return
        main = torch.cuda.current_stream(self.device)
        start = self._event(-1, 0)
        start.record(main)
        for unit in self.units.values():
            unit.stream.wait_event(start)
        current, carveout = main, 0
        try:
            for layer, k, j in order:
                op, unit, nb = layer_ops[layer][k], plans[layer].units[k], nano_batches[j]
                stream = unit.stream
                for event, owner in self._waits(plans, layer, k, nb):
                    if owner is not stream:
                        stream.wait_event(event)
                if stream is not current:
                    torch.cuda.set_stream(stream)
                    current = stream
                if unit.sm_carveout != carveout:
                    carveout = unit.sm_carveout
                    torch._C._set_sm_carveout_experimental(carveout or None)
                if self.hook:
                    self.hook(layer, op, nb, unit.spec.name, True)
                op.fn(buffers, nb, unit.cta_budget)
                if self.hook:
                    self.hook(layer, op, nb, unit.spec.name, False)
                self._event(k, j, layer).record(stream)
        finally:
            torch.cuda.set_stream(main)
            if carveout:
                torch._C._set_sm_carveout_experimental(None)
        # Join every unit's stream back (also those this iteration gave no work), so the main
        # stream, and a CUDA graph being captured on it, ends after all of it.
        for i, unit in enumerate(self.units.values()):
            done = self._event(-2, i)
            done.record(unit.stream)
            main.wait_event(done)


Executor = SequentialExecutor | NanoBatchExecutor | OverlappedExecutor


def make_executor(schedule: PipelineSchedule, device: torch.device) -> Executor:
    if schedule.overlap:
        return OverlappedExecutor(schedule, device)
    if schedule.num_nano_batches > 1:
        return NanoBatchExecutor()
    return SequentialExecutor()
