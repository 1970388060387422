"""Executors: run a model's layer ops over an iteration's nano-batches.

* ``SequentialExecutor``: one stream, whole GPU, op after op (the reference and the baseline).
* ``NanoBatchExecutor``: the nano-batches one after another on one stream (the cost of splitting).
* ``OverlappedExecutor``: each op on its execution unit's stream; CUDA events carry the data
  dependencies, so compute, memory and network ops of different nano-batches run at once. No host
  synchronisation happens inside an iteration.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from nanoflow.engine.batch import NanoBatch, StepBuffers
from nanoflow.pipeline.ops import Op, op_dependencies
from nanoflow.pipeline.schedule import LaunchOrder, PipelineSchedule
from nanoflow.pipeline.units import ExecutionUnit, build_units

LaunchHook = Callable[[int, Op, NanoBatch, str, bool], None]


def launch_order(num_ops: int, num_nano_batches: int, order: LaunchOrder) -> list[tuple[int, int]]:
    """(op index, nano-batch index) pairs of one layer, in the order they are launched."""
    if order is LaunchOrder.OP_MAJOR:
        return [(k, j) for k in range(num_ops) for j in range(num_nano_batches)]
    waves = num_ops + num_nano_batches - 1
    return [
        (w - j, j) for w in range(waves) for j in range(num_nano_batches) if 0 <= w - j < num_ops
    ]


@dataclass
class _LayerPlan:
    units: list[ExecutionUnit]
    deps: list[tuple[int, ...]]
    kv_op: int | None
    order: list[tuple[int, int]]


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
    """Operation-level pipeline over execution units (DESIGN §3)."""

    name = "overlapped"

    def __init__(self, schedule: PipelineSchedule, device: torch.device) -> None:
        self.schedule = schedule
        self.device = device
        self.units: dict[str, ExecutionUnit] = build_units(schedule, device)
        self.hook: LaunchHook | None = None
        self._events: dict[tuple[int, int], torch.cuda.Event] = {}
        self._plans: dict[tuple[tuple[str, ...], int], _LayerPlan] = {}

    def _event(self, op_index: int, nano_batch: int) -> torch.cuda.Event:
        """One reusable event per (op, nano-batch): its waiters are all enqueued before the
        next layer records it again, so reuse never loses a dependency."""
        key = (op_index, nano_batch)
        if key not in self._events:
            self._events[key] = torch.cuda.Event()
        return self._events[key]

    def _unit_per_op(self, ops: list[Op]) -> list[ExecutionUnit]:
        return [self.units[self.schedule.unit_of(op.name, op.resource).name] for op in ops]

    def _layer_plan(self, ops: list[Op], num_nano_batches: int) -> _LayerPlan:
        """Units, dependencies and launch order of a layer: the same for every layer of a
        model, so worked out once and kept off the per-launch path."""
        key = (tuple(op.name for op in ops), num_nano_batches)
        if key not in self._plans:
            units = self._unit_per_op(ops)
            self._plans[key] = _LayerPlan(
                units=units,
                deps=op_dependencies([op.name for op in ops], [op.after for op in ops]),
                kv_op=next((k for k, op in enumerate(ops) if op.writes_kv), None),
                order=launch_order(len(ops), num_nano_batches, self.schedule.launch_order),
            )
        return self._plans[key]

    def run(
        self, layer_ops: list[list[Op]], buffers: StepBuffers, nano_batches: list[NanoBatch]
    ) -> None:
        if self.device.type != "cuda":
            self._run_inline(layer_ops, buffers, nano_batches)
            return
        main = torch.cuda.current_stream(self.device)
        start = self._event(-1, 0)
        start.record(main)
        for unit in self.units.values():
            unit.stream.wait_event(start)
        current, carveout = main, 0
        # the event (and its stream) that op 0 of each nano-batch waits for: the previous layer
        entry: list[tuple[torch.cuda.Event, Any]] = [(start, main)] * len(nano_batches)
        try:
            for layer, ops in enumerate(layer_ops):
                plan = self._layer_plan(ops, len(nano_batches))
                units = plan.units
                for k, j in plan.order:
                    op, unit, nb = ops[k], units[k], nano_batches[j]
                    stream = unit.stream
                    needs = [(self._event(d, j), units[d].stream) for d in plan.deps[k]]
                    if not needs:
                        needs = [entry[j]]
                    if op.reads_other_kv and plan.kv_op is not None:
                        kv_stream = units[plan.kv_op].stream
                        needs += [(self._event(plan.kv_op, i), kv_stream) for i in nb.kv_deps]
                    for event, owner in needs:
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
                    self._event(k, j).record(stream)
                tail = len(ops) - 1
                entry = [
                    (self._event(tail, j), units[tail].stream) for j in range(len(nano_batches))
                ]
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

    def _run_inline(
        self, layer_ops: list[list[Op]], buffers: StepBuffers, nano_batches: list[NanoBatch]
    ) -> None:
        """On CPU there is nothing to overlap: run the launch order itself, which must respect
        every dependency the events would enforce on a GPU."""
        for ops in layer_ops:
            units = self._unit_per_op(ops)
            for k, j in launch_order(len(ops), len(nano_batches), self.schedule.launch_order):
                ops[k].fn(buffers, nano_batches[j], units[k].num_sms)


Executor = SequentialExecutor | NanoBatchExecutor | OverlappedExecutor


def make_executor(schedule: PipelineSchedule, device: torch.device) -> Executor:
    if schedule.overlap:
        return OverlappedExecutor(schedule, device)
    if schedule.num_nano_batches > 1:
        return NanoBatchExecutor()
    return SequentialExecutor()
