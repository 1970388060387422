"""Record when every (op, nano-batch) of an iteration ran on the GPU and draw it per execution unit,
so the overlap (or its absence) can be seen."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from nanoflow.runtime.batch import NanoBatch
from nanoflow.runtime.executors import OverlappedExecutor
from nanoflow.runtime.ops import Op


@dataclass
class TimelineRecord:
    layer: int
    op: str
    resource: str
    nano_batch: int
    unit: str
    start_ms: float
    end_ms: float


class TimelineRecorder:
    """Executor hook that brackets each launch with CUDA events on the unit's stream. The events
    take time of their own between the kernels; ``trace_timeline`` records the same timeline
    from the profiler's kernel records without them.

    ``in_graph``: the iteration is being captured into a CUDA graph, so the events are made
    external (recorded as graph nodes that fire on every replay) and ``attach`` belongs inside
    the capture too.
    """

    def __init__(self, in_graph: bool = False) -> None:
        self._external = in_graph
        self._origin = self._new_event()
        self._pending: list[tuple[int, Op, int, str, torch.cuda.Event, torch.cuda.Event]] = []
        self._open: dict[tuple[int, str, int], torch.cuda.Event] = {}

    def attach(self, executor: OverlappedExecutor) -> None:
        self._origin.record()
        executor.hook = self

    def __call__(self, layer: int, op: Op, nb: NanoBatch, unit: str, before: bool) -> None:
        event = self._new_event()
        event.record()
        key = (layer, op.name, nb.index)
        if before:
            self._open[key] = event
        else:
            self._pending.append((layer, op, nb.index, unit, self._open.pop(key), event))

    def _new_event(self) -> torch.cuda.Event:
        return torch.cuda.Event(enable_timing=True, external=self._external)

    def records(self) -> list[TimelineRecord]:
        torch.cuda.synchronize()
        return [
            TimelineRecord(
                layer,
                op.name,
                op.resource.value,
                nb,
                unit,
                self._origin.elapsed_time(start),
                self._origin.elapsed_time(end),
            )
            for layer, op, nb, unit, start, end in self._pending
        ]


_COLORS = {"compute": "tab:blue", "memory": "tab:orange", "network": "tab:green"}


def draw_timeline(records: list[TimelineRecord], path: str | Path, title: str = "") -> None:
    """A Gantt chart: one row per execution unit, bars coloured by resource class, labelled with
    the nano-batch index."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    units = sorted({r.unit for r in records})
    fig, ax = plt.subplots(figsize=(14, 1.0 + 0.8 * len(units)))
    for row, unit in enumerate(units):
        for r in (r for r in records if r.unit == unit):
            ax.barh(
                row,
                r.end_ms - r.start_ms,
                left=r.start_ms,
                height=0.6,
                color=_COLORS[r.resource],
                edgecolor="black",
                linewidth=0.3,
            )
            middle = (r.start_ms + r.end_ms) / 2
            ax.text(middle, row, str(r.nano_batch), ha="center", va="center", fontsize=5)
    ax.set_yticks(range(len(units)), units)
    ax.set_xlabel("time (ms)")
    ax.set_title(title or "pipeline timeline")
    handles = [plt.Rectangle((0, 0), 1, 1, color=c) for c in _COLORS.values()]
    ax.legend(handles, list(_COLORS), loc="upper right")
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def save_timeline(records: list[TimelineRecord], path: str | Path, provenance: dict) -> None:
    """The records as JSON beside ``provenance`` (device, versions, command, date)."""
    data = {**provenance, "experiment": "timeline", "records": [asdict(r) for r in records]}
    Path(path).write_text(json.dumps(data))
