"""A lower bound on one iteration's time, from the op tables: the least time the plan's ops
could take under a schedule however well they overlapped, so that a measured iteration above it
is overlap (or kernel time) the schedule left on the table, shown as one number.

What the bound assumes is what the tables measure: an op alone on a unit takes its table time
at that unit's SM budget; ops of classes a and b running together on two units are each slowed
by the factor f_ab >= 1 measured for that class pair (a pair not measured counts 1, which can
only lower the bound; where units share SMs, the factor measured for that layout holds the
sharing). Each op is read at its *best* time at any budget up to its unit's (the schedule could
have given it fewer SMs, and a noisy table must not lift the bound). Every term below then holds
for every execution of the schedule's ops, whatever the launch order; an iteration measured
below the bound says the tables are wrong for it, not that the bound is loose:

* **unit work**: a unit is one stream and runs one op at a time, so it is busy at least the sum
  of its ops' best times; the largest unit's sum bounds the iteration.
* **pairs of units**: two units overlap only by slowing each other. While u's class-a op and
  v's class-b op run together for t, each advances t / f_ab, so running x_ab of each side's work
  together costs f_ab x_ab instead of 2 x_ab and the pair needs at least
  W_u + W_v - sum_ab (2 - f_ab) x_ab, with sum_b x_ab <= W_u,a and sum_a x_ab <= W_v,b. The
  saving is at most each side's work weighted by its best partner's (2 - f) (exact when a unit
  runs one class): with f = 1 the term is max(W_u, W_v), with f >= 2 overlap saves nothing. A
  third unit slows an op by its worst partner only, so the pairwise argument still holds.
* **critical path**: an op starts after what it waits for ends (the layer graph's dependencies
  within a nano-batch, layer to layer, and prefill attention on earlier nano-batches' KV
  writes), so the longest chain of best times bounds the iteration whatever the units do.

Every layer does the same work, so the unit and pair terms over the iteration are the per-layer
terms times the layer count; the critical path is taken over the whole iteration, because
nano-batches pipeline from one layer into the next. The LM head runs after the last layer on the
whole GPU and adds to every term. The schedule's bound is the largest term.

The schedule is a choice: the same ops run sequentially on the whole GPU (each op once over the
whole batch, at its best time there) may beat it, when its nano-batches are too small or its
units too narrow to pay for the overlap. The bound is the smaller of the two, a time neither
this schedule nor the sequential one can beat, so measured / bound also counts the cost of
having chosen a schedule that overlaps worse than running without one. Host launch time is left
out: iterations replayed from CUDA graphs do not pay it, and eager ones show it in the ratio.
"""

from __future__ import annotations

import itertools
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from nanoflow.autotune.cost_model import Task, build_tasks, interference_key
from nanoflow.autotune.roofline import roofline_tables
from nanoflow.autotune.steady_state import SteadyBatch
from nanoflow.autotune.tables import OpTable, OpTables, load_tables
from nanoflow.engine.scheduler import BatchPlan
from nanoflow.errors import ConfigError, ProfileError
from nanoflow.models.spec import ModelSpec
from nanoflow.runtime.schedule import PipelineSchedule, sequential_schedule

ROOFLINE = "roofline"  # nominal tables from the model's FLOPs and bytes (runs on a CPU)
PROFILE = "profile"  # tables measured on the GPU in the run that asks


@dataclass(frozen=True)
class IterationBound:
    """The terms of one iteration's bound, in seconds (the layers' terms without the LM head)."""

    units_s: dict[str, float] = field(default_factory=dict)
    pairs_s: float = 0.0
    critical_path_s: float = 0.0
    lm_head_s: float = 0.0
    sequential_s: float = 0.0  # the plan on the whole GPU, one op after another, LM head included

    @property
    def schedule_s(self) -> float:
        layers = max(max(self.units_s.values(), default=0.0), self.pairs_s, self.critical_path_s)
        return layers + self.lm_head_s

    @property
    def bound_s(self) -> float:
        return min(self.schedule_s, self.sequential_s)

    @property
    def binding(self) -> str:
        """Which term sets the bound (ties go to the earlier name)."""
        if self.sequential_s < self.schedule_s * (1 - 1e-9):  # not a sum's rounding
            return "sequential"
        terms = {"units": max(self.units_s.values(), default=0.0), "pairs": self.pairs_s}
        terms["critical_path"] = self.critical_path_s
        return max(terms, key=lambda k: terms[k])

    def to_dict(self) -> dict[str, Any]:
        return {
            "bound_s": self.bound_s,
            "binding": self.binding,
            "schedule_s": self.schedule_s,
            "sequential_s": self.sequential_s,
            "units_s": dict(self.units_s),
            "pairs_s": self.pairs_s,
            "critical_path_s": self.critical_path_s,
            "lm_head_s": self.lm_head_s,
        }


def best_time(op: OpTable, tokens: float, context: float, sms: int) -> float:
    """The op's least table time at any SM budget up to ``sms``."""
    budgets = [s for s in op.sms if s < sms] + [sms]
    return min(op.time(tokens, context, s) for s in budgets)


def unit_work(tasks: Iterable[Task]) -> dict[str, dict[str, float]]:
    """Seconds of work each unit runs, by resource class."""
    work: dict[str, dict[str, float]] = {}
    for task in tasks:
        by_class = work.setdefault(task.unit, {})
        by_class[task.resource] = by_class.get(task.resource, 0.0) + task.seconds
    return work


def pair_seconds(
    u: dict[str, float], v: dict[str, float], factor: dict[tuple[str, str], float]
) -> float:
    """The least time two units need for their work (by class), overlapping as the interference
    ``factor[(a, b)]`` allows (module docstring; the factors are symmetric, as measured)."""

    def gain(a: str, b: str) -> float:
        return min(1.0, max(0.0, 2.0 - factor.get((a, b), 1.0)))

    def saving(mine: dict[str, float], theirs: dict[str, float]) -> float:
        partners = [b for b, w in theirs.items() if w > 0]
        return sum(w * max((gain(a, b) for b in partners), default=0.0) for a, w in mine.items())

    total = sum(u.values()) + sum(v.values())
    return total - min(saving(u, v), saving(v, u))


def critical_path(tasks: list[Task]) -> float:
    """The longest chain of dependencies (tasks come in launch order, each after its deps)."""
    finish: list[float] = []
    for task in tasks:
        finish.append(task.seconds + max((finish[d] for d in task.deps), default=0.0))
    return max(finish, default=0.0)


def iteration_bound(
    tables: OpTables,
    schedule: PipelineSchedule,
    batch: SteadyBatch,
    sampled_rows: int | None = None,
    num_layers: int | None = None,
) -> IterationBound:
    """The bound of one iteration of ``batch`` under ``schedule`` (``sampled_rows``: the LM
    head's rows, by default the steady state's)."""
    layers = num_layers or tables.num_layers
    rows = batch.sampled_rows if sampled_rows is None else sampled_rows
    lm_head = best_time(tables.lm_head, rows, 0, tables.sm_count)
    tasks = build_tasks(tables, schedule, batch, layers, best_time)
    sequential = build_tasks(tables, sequential_schedule(), batch, layers, best_time)
    work = unit_work(tasks)
    key = interference_key(schedule)
    classes = {c for by_class in work.values() for c in by_class}
    factor = {(a, b): tables.factor(key, a, b) for a in classes for b in classes}
    pairs = [pair_seconds(work[u], work[v], factor) for u, v in itertools.combinations(work, 2)]
    return IterationBound(
        units_s={unit: sum(by_class.values()) for unit, by_class in work.items()},
        pairs_s=max(pairs, default=0.0),
        critical_path_s=critical_path(tasks),
        lm_head_s=lm_head,
        sequential_s=sum(t.seconds for t in sequential) + lm_head,
    )


def plan_batch(plan: BatchPlan) -> tuple[SteadyBatch, int]:
    """An engine plan as the tables read it, and its LM head's rows: decodes at their mean
    context (the K/V each reads, its own token included), prompt chunks at their mean context
    weighted by their tokens (attention over a chunk reads the prompt up to its end)."""
    decodes = len(plan.decodes)
    prefill = plan.num_prefill_tokens
    decode_kv = sum(c.start + c.num_tokens for c in plan.decodes)
    prompt_kv = sum(c.num_tokens * (c.start + c.num_tokens) for c in plan.prefills)
    batch = SteadyBatch(
        decodes=decodes,
        prefill_tokens=prefill,
        decode_context=decode_kv / decodes if decodes else 0.0,
        prompt_len=prompt_kv / prefill if prefill else 0.0,
    )
    return batch, decodes + sum(c.samples for c in plan.prefills)


def compare(bounds: list[IterationBound], measured_s: float) -> dict[str, Any]:
    """Iterations that took ``measured_s`` in all beside their bounds, per iteration in ms."""
    n = max(1, len(bounds))
    total = sum(b.bound_s for b in bounds)
    return {
        "iterations": len(bounds),
        "measured_ms": 1e3 * measured_s / n,
        "bound_ms": 1e3 * total / n,
        "measured_over_bound": measured_s / total if total > 0 else None,
        "schedule_bound_ms": 1e3 * sum(b.schedule_s for b in bounds) / n,
        "sequential_ms": 1e3 * sum(b.sequential_s for b in bounds) / n,
        "binding": dict(Counter(b.binding for b in bounds)),
    }


def describe(summary: dict[str, Any]) -> str:
    """One line of ``compare``'s summary."""
    ratio = summary["measured_over_bound"]
    binding = ", ".join(f"{k} {v}" for k, v in summary["binding"].items())
    if ratio is None:
        return f"measured {summary['measured_ms']:.2f} ms per iteration, no work to bound"
    return (
        f"measured {summary['measured_ms']:.2f} ms per iteration, bound "
        f"{summary['bound_ms']:.2f} ms: {ratio:.2f}x the bound (sequential on the whole GPU "
        f"{summary['sequential_ms']:.2f} ms; binding term: {binding})"
    )


def tables_for(
    source: str,
    spec: ModelSpec,
    model: str,
    device: torch.device,
    dtype: torch.dtype = torch.bfloat16,
    kv_dtype: torch.dtype | None = None,
    quantization: str | None = None,
) -> OpTables:
    """Op tables for ``model``: a JSON file (``nanoflow tune --tables-out``), ``profile`` to
    measure them on ``device`` (a GPU, before the engine takes its memory), or ``roofline``.
    Tables of another model or KV cache type are refused, saying which."""
    kv_bytes = None if kv_dtype is None else kv_dtype.itemsize
    if source == ROOFLINE:
        return roofline_tables(spec, model, kv_dtype_bytes=kv_bytes)
    if source == PROFILE:
        if device.type != "cuda":
            raise ConfigError(f"profiling the ops needs a GPU; on {device} use {ROOFLINE!r}")
        from nanoflow.autotune.profiler import profile_op_tables

        return profile_op_tables(spec, model, device, dtype, kv_dtype, quantization)
    tables = load_tables(Path(source))
    if tables.architecture_hash != spec.architecture_hash():
        raise ProfileError(
            f"op tables {source} were measured for model {tables.model!r}, not {model!r}; "
            "profile this model"
        )
    if tables.kv_element_bytes != (kv_bytes or tables.dtype_bytes):
        raise ProfileError(
            f"op tables {source} were measured with a {tables.kv_element_bytes}-byte KV cache, "
            f"not the {'auto' if kv_bytes is None else f'{kv_bytes}-byte'!r} cache asked for; "
            "profile again with that cache"
        )
    return tables
