"""Predicted iteration time of a pipeline schedule, from the op tables.

A list-scheduling simulation of what the overlapped executor does: each execution unit is a FIFO
of its ops in launch order (a CUDA stream); an op starts when its unit is free and its
dependencies are done (the previous op of its nano-batch, and for prefill attention the KV
writes of earlier nano-batches holding the same prompt); it runs for its table time at its
unit's SM budget, slowed by the interference factor while ops of other units overlap it.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from nanoflow.autotune.steady_state import SteadyBatch
from nanoflow.autotune.tables import SHARED_SMS, OpTable, OpTables
from nanoflow.runtime.executors import iteration_order
from nanoflow.runtime.graph import LayerGraph, Resource, Rows, kv_dependencies
from nanoflow.runtime.schedule import Mechanism, PipelineSchedule, split_counts


@dataclass(frozen=True)
class Task:
    """One (layer, op, nano-batch) launch: the unit that runs it, its time alone on that unit,
    and the tasks (indices into the launch list) it waits on."""

    unit: str
    resource: str
    seconds: float
    deps: tuple[int, ...] = ()
    label: tuple[int, str, int] = (0, "", 0)  # (layer, op name, nano-batch)


@dataclass(frozen=True)
class Interval:
    unit: str
    layer: int
    op: str
    nano_batch: int
    start: float
    end: float


@dataclass(frozen=True)
class Prediction:
    """``iteration_s`` is the larger of the GPU time and the host time to launch it all."""

    iteration_s: float
    gpu_s: float
    host_s: float
    timeline: tuple[Interval, ...]

    def busy(self) -> dict[str, float]:
        """Seconds each unit spends running ops (for utilisation plots and tests)."""
        out: dict[str, float] = {}
        for iv in self.timeline:
            out[iv.unit] = out.get(iv.unit, 0.0) + iv.end - iv.start
        return out


Interference = dict[tuple[str, str], float]


def simulate(tasks: list[Task], interference: Interference | None = None) -> list[Interval]:
    """Run ``tasks`` (in launch order) on their units; ``interference[(a, b)]`` slows an op of
    class ``a`` while one of class ``b`` runs on another unit (the worst partner counts)."""
    interference = interference or {}
    queues: dict[str, deque[int]] = {}
    for i, task in enumerate(tasks):
        queues.setdefault(task.unit, deque()).append(i)
    remaining = [t.seconds for t in tasks]
    start = [math.nan] * len(tasks)
    done = [False] * len(tasks)
    out: list[Interval] = []
    running: dict[str, int] = {}
    now = 0.0

    def finish(i: int) -> None:
        done[i] = True
        layer, op, nb = tasks[i].label
        out.append(Interval(tasks[i].unit, layer, op, nb, start[i], now))

    while True:
        progress = True
        while progress:
            progress = False
            for unit, queue in queues.items():
                if unit in running or not queue or not all(done[d] for d in tasks[queue[0]].deps):
                    continue
                i = queue.popleft()
                start[i] = now
                if remaining[i] > 0:
                    running[unit] = i
                else:
                    finish(i)
                    progress = True
        if not running:
            if any(queues.values()):
                raise ValueError("the launch order waits on an op queued behind it (deadlock)")
            return out
        rates = {}
        for unit, i in running.items():
            slow = max(
                (
                    interference.get((tasks[i].resource, tasks[j].resource), 1.0)
                    for other, j in running.items()
                    if other != unit
                ),
                default=1.0,
            )
            rates[unit] = 1.0 / slow
        step = min(remaining[i] / rates[u] for u, i in running.items())
        now += step
        for unit, i in list(running.items()):
            if remaining[i] / rates[unit] <= step * (1 + 1e-9):
                remaining[i] = 0.0
                del running[unit]
                finish(i)
            else:
                remaining[i] -= step * rates[unit]


@dataclass(frozen=True)
class NanoBatchShape:
    decodes: int
    prefill_tokens: int

    @property
    def tokens(self) -> int:
        return self.decodes + self.prefill_tokens


def nano_batch_shapes(batch: SteadyBatch, schedule: PipelineSchedule) -> list[NanoBatchShape]:
    """The nano-batches ``prepare_step`` would cut (empty ones dropped, as it does)."""
    decodes = split_counts(batch.decodes, schedule.decode_shares)
    prefills = split_counts(batch.prefill_tokens, schedule.prefill_shares)
    shapes = [NanoBatchShape(d, p) for d, p in zip(decodes, prefills, strict=True)]
    return [s for s in shapes if s.tokens]


# seconds of an op at (tokens, context, SMs): the table's own time, or another reading of it
OpTime = Callable[[OpTable, float, float, int], float]


def _op_seconds(
    op: OpTable, nb: NanoBatchShape, batch: SteadyBatch, sms: int, time: OpTime
) -> float:
    if op.spec.rows is Rows.DECODE:
        return time(op, nb.decodes, batch.decode_context, sms)
    if op.spec.rows is Rows.PREFILL:
        return time(op, nb.prefill_tokens, batch.prompt_len, sms)
    return time(op, nb.tokens, 0, sms)


def _iteration_order(
    schedule: PipelineSchedule, graph: LayerGraph, num_nb: int, num_layers: int
) -> list[tuple[int, int, int]]:
    """(layer, op, nano-batch) in the order the executor launches them: without overlap the
    nano-batch executor's order (each layer nano-batch after nano-batch)."""
    num_ops = len(graph.ops)
    if not schedule.overlap:
        return [(L, k, j) for L in range(num_layers) for j in range(num_nb) for k in range(num_ops)]
    layers = ((num_ops, graph.head),) * num_layers
    return iteration_order(layers, num_nb, schedule.launch_order)


def steady_kv_deps(shapes: list[NanoBatchShape]) -> list[tuple[int, ...]]:
    """The KV dependencies ``prepare_step`` would find, assuming the worst case: each boundary
    between two nano-batches' prompt tokens cuts a prompt in two."""
    with_prompts = [j for j, s in enumerate(shapes) if s.prefill_tokens]
    owners: list[set[int]] = [set() for _ in shapes]
    for a, b in zip(with_prompts, with_prompts[1:], strict=False):
        owners[a].add(a)
        owners[b].add(a)
    return kv_dependencies(owners)


def build_tasks(
    tables: OpTables,
    schedule: PipelineSchedule,
    batch: SteadyBatch,
    num_layers: int,
    time: OpTime = OpTable.time,
) -> list[Task]:
    """The launches of ``num_layers`` layers in executor order, with their dependencies, each
    op timed by ``time`` at its unit's SM budget."""
    shapes = nano_batch_shapes(batch, schedule)
    units, sms = [], []
    for op in tables.ops:
        unit = schedule.unit_of(op.name, op.spec.resource) if schedule.overlap else None
        units.append(unit.name if unit else "main")
        sms.append((unit.num_sms or tables.sm_count) if unit else tables.sm_count)
    seconds = [
        [_op_seconds(op, nb, batch, sms[k], time) for nb in shapes]
        for k, op in enumerate(tables.ops)
    ]
    graph, kv_deps = tables.graph, steady_kv_deps(shapes)
    tasks: list[Task] = []
    index: dict[tuple[int, int, int], int] = {}
    for layer, k, j in _iteration_order(schedule, graph, len(shapes), num_layers):
        waits = graph.waits(layer, k, j, kv_deps[j], graph if layer else None)
        deps = tuple(index[w] for w in waits)
        index[(layer, k, j)] = len(tasks)
        op = tables.ops[k]
        tasks.append(Task(units[k], op.spec.resource, seconds[k][j], deps, (layer, op.name, j)))
    return tasks


def interference_key(schedule: PipelineSchedule) -> str:
    """Which measured interference applies: units on disjoint SMs slow each other through memory
    and caches; a CTA-limited unit beside one that keeps the whole GPU also competes for SMs."""
    shares = len(schedule.units) > 1 and any(u.num_sms is None for u in schedule.units)
    if schedule.mechanism is Mechanism.CTA_LIMIT and shares:
        return SHARED_SMS
    return schedule.mechanism.value


def predict(
    tables: OpTables,
    schedule: PipelineSchedule,
    batch: SteadyBatch,
    num_layers: int | None = None,
    launch_bound: bool = True,
) -> Prediction:
    """Predicted time of one iteration of ``batch`` under ``schedule`` (all layers, then the
    LM head on the whole GPU). ``launch_bound``: the host launches every op, so the iteration
    takes at least that long; not so for one replayed from a CUDA graph."""
    layers = num_layers or tables.num_layers
    tasks = build_tasks(tables, schedule, batch, layers)
    mechanism = interference_key(schedule)
    classes = [r.value for r in Resource]
    interference = {(a, b): tables.factor(mechanism, a, b) for a in classes for b in classes}
    timeline = simulate(tasks, interference if schedule.overlap else None)
    makespan = max((iv.end for iv in timeline), default=0.0)
    gpu = makespan + tables.lm_head.time(batch.sampled_rows, 0, tables.sm_count)
    host = len(tasks) * tables.launch_seconds if launch_bound else 0.0
    return Prediction(max(gpu, host), gpu, host, tuple(timeline))
