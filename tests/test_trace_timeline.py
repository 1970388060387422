"""Timelines from profiler traces: eager kernels labelled by the range that launched them, a
replayed graph's kernels labelled from the eager ones (by graph node order, else by stream order),
records per launch, the labelled ops under the real CPU profiler, and the script's dry run."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from nanoflow.runtime.batch import NanoBatch
from nanoflow.runtime.executors import NanoBatchExecutor
from nanoflow.runtime.graph import OpSpec, Resource
from nanoflow.runtime.ops import Op
from nanoflow.runtime.schedule import PipelineSchedule, UnitSpec
from nanoflow.runtime.trace_timeline import (
    Launch,
    chrome_trace,
    label_eager,
    label_ranges,
    label_replay,
    labelled_ops,
    launch_label,
    parse_label,
    span_ms,
    timeline_records,
)

EXPERIMENTS = Path(__file__).resolve().parent.parent / "experiments"
sys.path.insert(0, str(EXPERIMENTS))

import plots  # noqa: E402

MAIN, COMPUTE, MEMORY = 7, 20, 24
GEMM, NORM, ATTN, COMBINE = "nvjet_gemm", "rms_norm_kernel", "decode_attention", "lse_combine"


def _launch(layer: int, op: str, nb: int) -> Launch:
    kind = "memory" if op in ("input_norm", "decode_attention") else "compute"
    return Launch(layer, op, kind, nb, kind)


def _iteration(layers: int = 2) -> list[tuple[Launch | None, int, list[str]]]:
    """(launch, eager stream, kernel names) in launch order: the embedding on the main stream,
    then per layer and nano-batch a norm and attention (two kernels) on the memory unit's stream
    and a split-K GEMM (two kernels of one name) on the compute unit's."""
    out: list[tuple[Launch | None, int, list[str]]] = [(None, MAIN, ["embedding"])]
    for layer in range(layers):
        for nb in range(2):
            out.append((_launch(layer, "input_norm", nb), MEMORY, [NORM]))
            out.append((_launch(layer, "qkv_proj", nb), COMPUTE, [GEMM, GEMM]))
            out.append((_launch(layer, "decode_attention", nb), MEMORY, [ATTN, COMBINE]))
    return out


def _kernel(name: str, stream: int, ts: float, dur: float, correlation: int = 0, node: int = 0):
    args = {"stream": stream, "correlation": correlation, "graph node id": node}
    return {"ph": "X", "cat": "kernel", "name": name, "pid": 0, "tid": stream, "ts": ts,
            "dur": dur, "args": args}  # fmt: skip


def _eager_trace(iteration) -> tuple[dict, list[dict]]:
    """A CUDA-like eager trace: each launch a host range holding one launch call per kernel
    (Triton's through the driver API), each stream running its kernels in order after their
    launch; also the kernels in launch order."""
    events, kernels, host, correlation = [], [], 100.0, 0
    free: dict[int, float] = {}
    for launch, stream, names in iteration:
        start = host
        for name in names:
            correlation += 1
            cat = "cuda_driver" if name == ATTN else "cuda_runtime"
            args = {"correlation": correlation}
            events.append({"ph": "X", "cat": cat, "name": "cudaLaunchKernel", "tid": 1,
                           "ts": host + 1, "dur": 2, "args": args})  # fmt: skip
            begin = max(free.get(stream, 0.0), host + 5)
            kernels.append(_kernel(name, stream, begin, 10.0, correlation))
            free[stream] = begin + 10.0
            host += 4
        if launch is not None:
            events.append({"ph": "X", "cat": "user_annotation", "name": launch_label(launch),
                           "tid": 1, "ts": start, "dur": host - start, "args": {}})  # fmt: skip
        host += 1
    return {"traceEvents": events + kernels[::-1]}, kernels


def _replay_trace(iteration, nodes: list[int], one_stream_each: bool) -> dict:
    """The same kernels as a graph replay: no host events, each captured stream's chain in
    order (chains offset so they interleave), on the driver's streams (``one_stream_each``: a
    new one per kernel, else one per captured stream), with graph node ids ``nodes`` (in launch
    order)."""
    free = {MAIN: 0.0, COMPUTE: 3.0, MEMORY: 6.0}
    kernels, k = [], 0
    for _, stream, names in iteration:
        for name in names:
            replay_stream = 1000 + k if one_stream_each else stream + 50
            kernels.append(_kernel(name, replay_stream, free[stream], 7.0, node=nodes[k]))
            free[stream] += 8.0
            k += 1
    random.Random(0).shuffle(kernels)
    return {"traceEvents": kernels}


def _launches(labelled) -> list[Launch | None]:
    return [launch for launch, _ in labelled]


def _expected_launches(iteration) -> list[Launch | None]:
    return [launch for launch, _, names in iteration for _ in names]


def test_a_launch_label_round_trips_and_other_ranges_are_not_launches():
    launch = Launch(3, "gate_up_proj", "compute", 1, "gemm|unit")
    assert parse_label(launch_label(launch)) == launch
    assert parse_label("aten::mm") is None and parse_label("nanoflow|x") is None


def test_eager_kernels_are_labelled_by_the_range_that_launched_them():
    iteration = _iteration()
    trace, kernels = _eager_trace(iteration)
    labelled = label_eager(trace)
    assert _launches(labelled) == _expected_launches(iteration)
    assert [a.name for _, a in labelled] == [k["name"] for k in kernels]
    assert {a.stream for launch, a in labelled if launch and launch.unit == "memory"} == {MEMORY}


def test_records_span_each_launch_from_the_iteration_start_and_keep_the_first_layers():
    labelled = label_eager(_eager_trace(_iteration(layers=3))[0])
    records = timeline_records(labelled, layers=2)
    assert {r.layer for r in records} == {0, 1} and len(records) == 2 * 2 * 3
    origin = min(a.start_us for _, a in labelled)
    qkv = [a for launch, a in labelled if launch == _launch(0, "qkv_proj", 1)]
    (record,) = [r for r in records if (r.layer, r.op, r.nano_batch) == (0, "qkv_proj", 1)]
    assert len(qkv) == 2 and record.unit == "compute" and record.resource == "compute"
    assert record.start_ms == pytest.approx((qkv[0].start_us - origin) / 1e3)
    assert record.end_ms == pytest.approx((qkv[1].end_us - origin) / 1e3)
    assert span_ms(labelled) == pytest.approx((max(a.end_us for _, a in labelled) - origin) / 1e3)


def test_a_replay_is_labelled_by_graph_node_order_whatever_its_streams():
    iteration = _iteration()
    expected = label_eager(_eager_trace(iteration)[0])
    nodes = [(5 << 32) + 3 + 2 * k for k in range(len(expected))]
    mapping = label_replay(_replay_trace(iteration, nodes, one_stream_each=True), expected)
    assert mapping.method == "graph node order"
    assert (mapping.unmatched, mapping.missing) == (0, 0)
    assert _launches(mapping.labelled) == _expected_launches(iteration)
    assert [a.graph_node for _, a in mapping.labelled] == nodes


@pytest.mark.parametrize("nodes", ["none", "shuffled"])
def test_without_a_node_order_a_replay_is_labelled_by_stream_order(nodes):
    """Node ids missing, or in an order that does not reproduce the kernel names: each captured
    stream's chain is matched in start order (the GEMM's two kernels of one name included)."""
    iteration = _iteration()
    expected = label_eager(_eager_trace(iteration)[0])
    ids = list(range(1, len(expected) + 1))
    if nodes == "none":
        ids = [0] * len(expected)
    else:
        random.Random(1).shuffle(ids)
    replay = _replay_trace(iteration, ids, one_stream_each=nodes == "shuffled")
    mapping = label_replay(replay, expected)
    assert mapping.method == "stream order"
    assert (mapping.unmatched, mapping.missing) == (0, 0)
    by_node = {a.graph_node: launch for launch, a in mapping.labelled}
    if nodes == "shuffled":  # the k-th launched kernel carries ids[k]
        assert [by_node[i] for i in ids] == _expected_launches(iteration)
    records = timeline_records(mapping.labelled)
    assert len(records) == 2 * 2 * 3


def test_stream_order_gives_a_name_two_chains_share_to_the_replay_stream_it_ran_on():
    """Both units start with the same elementwise kernel at the same time; the replay streams
    that ran each chain before say which is which."""
    iteration = [
        (_launch(0, "input_norm", 0), MEMORY, [NORM, "elementwise"]),
        (_launch(0, "qkv_proj", 0), COMPUTE, [GEMM, "elementwise"]),
    ]
    expected = label_eager(_eager_trace(iteration)[0])
    replay = {"traceEvents": [
        _kernel(GEMM, 61, 0.0, 5.0), _kernel(NORM, 62, 1.0, 4.0),
        _kernel("elementwise", 62, 5.5, 1.0), _kernel("elementwise", 61, 5.5, 1.0),
    ]}  # fmt: skip
    mapping = label_replay(replay, expected)
    assert {(launch.op, a.name): a.stream for launch, a in mapping.labelled} == {
        ("input_norm", NORM): 62, ("input_norm", "elementwise"): 62,
        ("qkv_proj", GEMM): 61, ("qkv_proj", "elementwise"): 61,
    }  # fmt: skip


def test_a_replay_that_differs_from_the_eager_kernels_says_by_how_much():
    iteration = _iteration(layers=1)
    expected = label_eager(_eager_trace(iteration)[0])
    replay = _replay_trace(iteration, [0] * len(expected), one_stream_each=False)
    dropped = next(e for e in replay["traceEvents"] if e["name"] == COMBINE)
    replay["traceEvents"].remove(dropped)
    replay["traceEvents"].append(_kernel("memset_kernel", 99, 0.5, 1.0))
    mapping = label_replay(replay, expected)
    assert (mapping.unmatched, mapping.missing) == (1, 1)
    assert len(mapping.labelled) == len(expected) - 1


def _op(name: str, resource: Resource, ran: list[str]) -> Op:
    def fn(buffers, nb, num_sms) -> None:
        ran.append(f"{name}/{nb.index}")
        torch.ones(8, 8) @ torch.ones(8, 8)

    return Op(OpSpec(name, resource), fn)


def test_labelled_ops_run_as_the_plain_ones_and_trace_on_cpu():
    ran: list[str] = []
    ops = [_op("norm", Resource.MEMORY, ran), _op("gemm", Resource.COMPUTE, ran)]
    schedule = PipelineSchedule(
        decode_shares=(0.5, 0.5),
        prefill_shares=(0.5, 0.5),
        units=(UnitSpec("compute"), UnitSpec("memory")),
        op_units={"compute": "compute", "memory": "memory", "network": "compute"},
    )
    nano_batches = [NanoBatch(i, 4 * i, 4 * i + 4, 4, None, None, ()) for i in range(2)]
    layered = labelled_ops([ops, ops], schedule)
    trace = chrome_trace(
        lambda: NanoBatchExecutor().run(layered, None, nano_batches), torch.device("cpu")
    )
    assert ran == ["norm/0", "gemm/0", "norm/1", "gemm/1"] * 2
    records = timeline_records(label_ranges(trace))
    assert [f"{r.op}/{r.nano_batch}" for r in records] == ran
    assert {(r.op, r.unit, r.resource) for r in records} == {
        ("norm", "memory", "memory"), ("gemm", "compute", "compute")}  # fmt: skip
    assert records[0].start_ms == 0.0
    assert all(a.end_ms <= b.start_ms for a, b in zip(records, records[1:], strict=False))


def test_a_traced_timeline_figure_names_its_span_beside_the_untimed_iteration(tmp_path):
    labelled = label_eager(_eager_trace(_iteration())[0])
    record = {"gpu": "NVIDIA H200", "traced_span_ms": 8.0, "untimed_ms": 7.9,
              "records": [vars(r) for r in timeline_records(labelled)]}  # fmt: skip
    path = plots.timeline_figure(record, "x", tmp_path / "t.png")
    assert path.stat().st_size > 0


@pytest.mark.timeout(300)
def test_timeline_trace_dry_run(tmp_path):
    """The script's CPU run: eager, the builtin model, one JSON and figure per schedule."""
    schedules = "sequential,overlap-attn-all/66-high-alternating"
    args = ["--device", "cpu", "--model", "builtin", "--budget", "64", "--context", "48",
            "--prefill-chunks", "1", "--schedules", schedules, "--label", "dry"]  # fmt: skip
    cmd = [sys.executable, str(EXPERIMENTS / "timeline_trace.py"), *args, "--out", str(tmp_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=280, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    folder = tmp_path / "cpu" / "timeline"
    overlapped, sequential = (
        json.loads((folder / f"dry-{name}-eager.json").read_text())
        for name in ("overlap-attn-all-66-high-alternating", "sequential")
    )
    for record, units in ((sequential, {"main"}), (overlapped, {"compute", "memory"})):
        assert record["experiment"] == "timeline" and record["launch"] == "eager"
        assert {r["unit"] for r in record["records"]} == units
        assert record["traced_span_ms"] > 0 and record["untimed_ms"] > 0
        assert (record["unmatched_activities"], record["missing_activities"]) == (0, 0)
        for key in ("date", "versions", "command", "device"):
            assert record[key]
    assert {r["nano_batch"] for r in overlapped["records"]} == {0, 1}
    assert (folder / "dry-sequential-eager.png").stat().st_size > 0
    assert (folder / "dry-sequential-eager_raw" / "eager.trace.json.gz").exists()
