"""An iteration's timeline from the profiler's kernel records (CUPTI activities) instead of CUDA
events placed between the launches, which perturb the pipeline they time.

Each op launch is wrapped in a profiler range named after its (layer, op, nano-batch, unit).
An eager iteration links every kernel to the range it was launched in, through the launch's
correlation id. A replayed CUDA graph reports the same kernels with no CPU range around them, on
streams of the driver's choosing, so the eager iteration's labelled kernels, in launch order, are
what a replay's kernels are matched against: in graph node order where it reproduces the
launched kernel names (node ids that count up as the capture adds nodes are launch order), else
by stream order (each captured stream's kernels run in order, so its chain is matched name by
name). The mapping records which of the two it used and what it could not match.

The parsing functions read an exported Chrome trace (``torch.profiler`` ``export_chrome_trace``)
and need no GPU.
"""

from __future__ import annotations

import bisect
import json
import tempfile
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from nanoflow.runtime.batch import NanoBatch, StepBuffers
from nanoflow.runtime.ops import Op
from nanoflow.runtime.schedule import PipelineSchedule
from nanoflow.runtime.timeline import TimelineRecord

_PREFIX = "nanoflow"
_SEP = "|"
_WORK = ("kernel", "gpu_memcpy", "gpu_memset")
_LAUNCH_API = ("cuda_runtime", "cuda_driver")
# how far a chain may be skipped to match a replay activity (past kernels the replay lacks)
_LOOKAHEAD = 4


@dataclass(frozen=True)
class Launch:
    """One op applied to one nano-batch, as the executor launched it."""

    layer: int
    op: str
    resource: str
    nano_batch: int
    unit: str


@dataclass(frozen=True)
class Activity:
    """A kernel, copy or memset on the GPU (on CPU: a labelled range on the host clock)."""

    name: str
    stream: int
    start_us: float
    end_us: float
    correlation: int = 0
    graph_node: int = 0


Labelled = tuple[Launch | None, Activity]


@dataclass(frozen=True)
class Mapping:
    """A replay's activities labelled with their launches. ``unmatched``: replay activities no
    launch claimed; ``missing``: launched activities the replay did not show (both 0 when the
    mapping is faithful)."""

    labelled: list[Labelled]
    method: str
    unmatched: int
    missing: int


def launch_label(launch: Launch) -> str:
    """The profiler range name of a launch (``parse_label`` reads it back)."""
    fields = (launch.layer, launch.nano_batch, launch.resource, launch.op, launch.unit)
    return _SEP.join((_PREFIX, *map(str, fields)))


def parse_label(name: str) -> Launch | None:
    """The launch a range name labels; None for any other range."""
    parts = name.split(_SEP, 5)
    if len(parts) != 6 or parts[0] != _PREFIX:
        return None
    _, layer, nano_batch, resource, op, unit = parts
    return Launch(int(layer), op, resource, int(nano_batch), unit)


def labelled_ops(layer_ops: list[list[Op]], schedule: PipelineSchedule) -> list[list[Op]]:
    """``layer_ops`` with each call inside a profiler range that names its launch; an executor
    runs them as it runs the plain ops."""
    return [
        [_labelled(op, layer, schedule.unit_of(op.name, op.resource).name) for op in ops]
        for layer, ops in enumerate(layer_ops)
    ]


def _labelled(op: Op, layer: int, unit: str) -> Op:
    def fn(buffers: StepBuffers, nb: NanoBatch, num_sms: int | None) -> None:
        launch = Launch(layer, op.name, op.resource.value, nb.index, unit)
        with torch.profiler.record_function(launch_label(launch)):
            op.fn(buffers, nb, num_sms)

    return Op(op.spec, fn)


def chrome_trace(fn: Callable[[], None], device: torch.device) -> dict[str, Any]:
    """The profiler's Chrome trace of ``fn`` (host ranges, and the GPU's activities on CUDA)."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "trace.json"
        prof.export_chrome_trace(str(path))
        return json.loads(path.read_text())


def _events(trace: dict[str, Any], categories: Iterable[str]) -> list[dict[str, Any]]:
    wanted = set(categories)
    return [
        e for e in trace.get("traceEvents", []) if e.get("ph") == "X" and e.get("cat") in wanted
    ]


def gpu_activities(trace: dict[str, Any]) -> list[Activity]:
    """The trace's kernels, copies and memsets, in start order."""
    out = []
    for e in _events(trace, _WORK):
        args = e.get("args", {})
        out.append(
            Activity(
                e["name"],
                int(args.get("stream", e.get("tid", 0))),
                float(e["ts"]),
                float(e["ts"]) + float(e.get("dur", 0)),
                int(args.get("correlation", 0)),
                int(args.get("graph node id", 0) or 0),
            )
        )
    return sorted(out, key=lambda a: (a.start_us, a.graph_node))


def _ranges(trace: dict[str, Any]) -> list[tuple[float, float, Launch]]:
    """The labelled ranges, in start order (one thread launches an iteration)."""
    out = []
    for e in _events(trace, ("user_annotation",)):
        if (launch := parse_label(e["name"])) is not None:
            out.append((float(e["ts"]), float(e["ts"]) + float(e["dur"]), launch))
    return sorted(out, key=lambda r: r[0])


def _enclosing(ranges: list[tuple[float, float, Launch]], ts: float) -> Launch | None:
    """The labelled range around host time ``ts`` (labelled ranges never nest)."""
    i = bisect.bisect_right(ranges, ts, key=lambda r: r[0]) - 1
    return ranges[i][2] if i >= 0 and ts <= ranges[i][1] else None


def label_eager(trace: dict[str, Any]) -> list[Labelled]:
    """Each GPU activity of an eager iteration with the launch whose range issued it (None for
    work outside every op, such as the embedding), in launch order."""
    ranges = _ranges(trace)
    issued = {
        e["args"]["correlation"]: float(e["ts"])
        for e in _events(trace, _LAUNCH_API)
        if "correlation" in e.get("args", {})
    }
    out = []
    for activity in sorted(gpu_activities(trace), key=lambda a: a.correlation):
        ts = issued.get(activity.correlation)
        out.append((None if ts is None else _enclosing(ranges, ts), activity))
    return out


def label_ranges(trace: dict[str, Any]) -> list[Labelled]:
    """The labelled ranges themselves as activities: the timeline of an iteration on CPU, where
    an op's host time is its run time."""
    return [(launch, Activity(launch.op, 0, start, end)) for start, end, launch in _ranges(trace)]


def label_replay(trace: dict[str, Any], expected: list[Labelled]) -> Mapping:
    """A replayed graph's activities labelled from ``expected`` (``label_eager`` of the same
    iteration run eagerly): by graph node order when it reproduces the launched kernel names,
    else by stream order."""
    replayed = gpu_activities(trace)
    names = [a.name for _, a in expected]
    if replayed and all(a.graph_node for a in replayed):
        by_node = sorted(replayed, key=lambda a: a.graph_node)
        if [a.name for a in by_node] == names:
            labelled = [(launch, a) for (launch, _), a in zip(expected, by_node, strict=True)]
            return Mapping(labelled, "graph node order", 0, 0)
    return _by_stream_order(replayed, expected)


def _by_stream_order(replayed: list[Activity], expected: list[Labelled]) -> Mapping:
    """Match replay activities, in start order, against the captured streams' chains by name:
    the nearest chain entry of that name (entries skipped on the way are missing from the
    replay); where several chains offer it, the chain this replay stream last matched wins,
    else the one launched first."""
    chains: dict[int, deque[int]] = {}
    for i, (_, activity) in enumerate(expected):
        chains.setdefault(activity.stream, deque()).append(i)
    bound: dict[int, int] = {}
    found: dict[int, Activity] = {}
    unmatched = 0
    for activity in replayed:
        claim = _claim(chains, expected, activity.name)
        if claim is None:
            unmatched += 1
            continue
        depth, offers = claim
        chain = bound.get(activity.stream)
        if chain not in offers:
            chain = min(offers, key=lambda s: chains[s][depth])
        bound[activity.stream] = chain
        for _ in range(depth):
            chains[chain].popleft()
        found[chains[chain].popleft()] = activity
    labelled = [(expected[i][0], found[i]) for i in sorted(found)]
    return Mapping(labelled, "stream order", unmatched, len(expected) - len(found))


def _claim(
    chains: dict[int, deque[int]], expected: list[Labelled], name: str
) -> tuple[int, list[int]] | None:
    """The fewest chain entries to skip to reach ``name`` (at most ``_LOOKAHEAD``), and the
    chains that offer it there."""
    for depth in range(_LOOKAHEAD):
        offers = [
            s for s, c in chains.items() if len(c) > depth and expected[c[depth]][1].name == name
        ]
        if offers:
            return depth, offers
    return None


def span_ms(labelled: list[Labelled]) -> float:
    """First start to last end of every activity (labelled or not)."""
    if not labelled:
        return 0.0
    return (max(a.end_us for _, a in labelled) - min(a.start_us for _, a in labelled)) / 1e3


def timeline_records(labelled: list[Labelled], layers: int | None = None) -> list[TimelineRecord]:
    """One record per launch, from its first activity's start to its last one's end, in ms from
    the iteration's first activity; ``layers`` keeps only the first that many layers."""
    if not labelled:
        return []
    origin = min(a.start_us for _, a in labelled)
    spans: dict[Launch, list[float]] = {}
    for launch, activity in labelled:
        if launch is None or (layers is not None and launch.layer >= layers):
            continue
        span = spans.setdefault(launch, [activity.start_us, activity.end_us])
        span[0], span[1] = min(span[0], activity.start_us), max(span[1], activity.end_us)
    return [
        TimelineRecord(
            launch.layer,
            launch.op,
            launch.resource,
            launch.nano_batch,
            launch.unit,
            (start - origin) / 1e3,
            (end - origin) / 1e3,
        )
        for launch, (start, end) in sorted(spans.items(), key=lambda item: item[1][0])
    ]
