"""The overlapped executor's CUDA path, run against simulated streams and events: every op must
happen after everything it depends on (same nano-batch ops it waits for, the previous layer,
earlier nano-batches' KV writes), whatever the units and launch order, and the main stream must
end after all of it. Event reuse across layers is where such code breaks; this checks it without
a GPU."""

from __future__ import annotations

import types

import pytest
import torch

from nanoflow.runtime import executors as executors_module
from nanoflow.runtime.batch import NanoBatch
from nanoflow.runtime.executors import OverlappedExecutor
from nanoflow.runtime.graph import llama_graph
from nanoflow.runtime.ops import Op
from nanoflow.runtime.schedule import LaunchOrder, PipelineSchedule, UnitSpec


class FakeStream:
    """A stream as an ordered list of items; ``edges`` are cross-stream waits."""

    def __init__(self, sim: Simulator, name: str) -> None:
        self.sim, self.name, self.items = sim, name, []

    def wait_event(self, event: FakeEvent) -> None:
        if event.recorded is not None:
            self.sim.edges.append((event.recorded, (self, len(self.items))))
        self.items.append(("wait",))


class FakeEvent:
    def __init__(self, sim: Simulator) -> None:
        self.sim, self.recorded = sim, None

    def record(self, stream: FakeStream | None = None) -> None:
        stream = stream or self.sim.current
        stream.items.append(("record",))
        self.recorded = (stream, len(stream.items) - 1)


class Simulator:
    def __init__(self) -> None:
        self.edges: list[tuple[tuple[FakeStream, int], tuple[FakeStream, int]]] = []
        self.main = FakeStream(self, "main")
        self.current = self.main
        self.where: dict[tuple[int, str, int], tuple[FakeStream, int]] = {}

    def run_op(self, key: tuple[int, str, int]) -> None:
        self.current.items.append(("op", key))
        self.where[key] = (self.current, len(self.current.items) - 1)

    def happens_before(self, a: tuple[FakeStream, int], b: tuple[FakeStream, int]) -> bool:
        """Is there a path from item ``a`` to item ``b`` (stream order plus waits)?"""
        frontier, seen = [a], set()
        while frontier:
            stream, pos = frontier.pop()
            if stream is b[0] and pos <= b[1]:
                return True
            if (id(stream), pos) in seen:
                continue
            seen.add((id(stream), pos))
            for (src, src_pos), dst in self.edges:
                if src is stream and src_pos >= pos:
                    frontier.append(dst)
        return False


@pytest.mark.parametrize("order", list(LaunchOrder))
@pytest.mark.parametrize("network", [False, True])
@pytest.mark.parametrize(
    "op_units",
    [
        {"compute": "compute", "memory": "memory", "network": "net"},
        {
            "compute": "memory",
            "memory": "compute",
            "network": "compute",
            "prefill_attention": "net",
        },
    ],
)
def test_every_dependency_happens_before(monkeypatch, order, network, op_units):
    sim = Simulator()
    schedule = PipelineSchedule(
        decode_shares=(0.4, 0.3, 0.3),
        prefill_shares=(0.2, 0.5, 0.3),
        units=(UnitSpec("compute", 96), UnitSpec("memory", 36), UnitSpec("net", 8)),
        op_units=op_units,
        launch_order=order,
        overlap=True,
    )
    executor = OverlappedExecutor(schedule, torch.device("cpu"))
    for unit in executor.units.values():
        unit.stream = FakeStream(sim, unit.spec.name)
    executor.device = types.SimpleNamespace(type="cuda")
    fake_cuda = types.SimpleNamespace(
        current_stream=lambda device=None: sim.main,
        Event=lambda: FakeEvent(sim),
        set_stream=lambda stream: setattr(sim, "current", stream),
        Stream=FakeStream,
    )
    monkeypatch.setattr(executors_module.torch, "cuda", fake_cuda)
    monkeypatch.setattr(torch._C, "_set_sm_carveout_experimental", lambda n: None)

    num_layers = 3
    graph = llama_graph(tensor_parallel=network)
    layer_ops = [
        [
            Op(spec, lambda b, nb, sms, n=spec.name, L=layer: sim.run_op((L, n, nb.index)))
            for spec in graph.ops
        ]
        for layer in range(num_layers)
    ]
    nbs = [
        NanoBatch(0, 0, 4, 2, None, None, ()),
        NanoBatch(1, 4, 9, 2, None, None, (0,)),
        NanoBatch(2, 9, 12, 1, None, None, (0, 1)),
    ]
    executor.run(layer_ops, None, nbs)
    end = (sim.main, len(sim.main.items))

    names = [op.name for op in layer_ops[0]]
    deps = graph.deps
    assert len(sim.where) == num_layers * len(names) * len(nbs)
    for layer in range(num_layers):
        for k, name in enumerate(names):
            for nb in nbs:
                here = sim.where[(layer, name, nb.index)]
                needs = [(layer, names[d], nb.index) for d in deps[k]]
                if not deps[k] and layer:
                    needs.append((layer - 1, names[-1], nb.index))
                if graph.ops[k].reads_other_kv:
                    needs += [(layer, "rope_kv_write", i) for i in nb.kv_deps]
                for need in needs:
                    assert sim.happens_before(sim.where[need], here), (need, "->", name, nb.index)
                assert sim.happens_before(here, end), (layer, name, nb.index)
