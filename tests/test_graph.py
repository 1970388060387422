"""The layer graph: one definition per architecture, bound by the models and iterated by the
executors and the cost model alike."""

from __future__ import annotations

import pytest
import torch

from nanoflow.autotune.cost_model import NanoBatchShape, build_tasks, steady_kv_deps
from nanoflow.autotune.roofline import roofline_tables
from nanoflow.autotune.steady_state import SteadyBatch
from nanoflow.models.builtin import BUILTIN_SPEC
from nanoflow.runtime.batch import NanoBatch
from nanoflow.runtime.executors import OverlappedExecutor
from nanoflow.runtime.graph import (
    LayerGraph,
    OpSpec,
    Resource,
    Rows,
    kv_dependencies,
    llama_graph,
    mixtral_graph,
)
from nanoflow.runtime.ops import Op
from nanoflow.runtime.schedule import LaunchOrder, shared_sm_schedule


def test_llama_graph_waits_and_head():
    graph = llama_graph()
    names = graph.names
    deps = {names[k]: {names[d] for d in ds} for k, ds in enumerate(graph.deps)}
    assert deps["prefill_attention"] == {"rope_kv_write"}
    assert deps["o_proj"] == {"decode_attention", "prefill_attention"}
    assert deps["input_norm"] == set()
    assert names[graph.kv_op] == "rope_kv_write"
    assert names[graph.head - 1] == "decode_attention"
    assert graph.ops[names.index("decode_attention")].rows is Rows.DECODE


def test_tensor_parallel_adds_an_all_reduce_after_each_half():
    names = llama_graph(tensor_parallel=True).names
    assert names[names.index("o_proj") + 1] == "attn_all_reduce"
    assert names[-1] == "mlp_all_reduce"


def test_mixtral_graph_replaces_the_dense_mlp():
    dense, moe = llama_graph().names, mixtral_graph().names
    at = dense.index("post_attn_norm") + 1
    assert moe[:at] == dense[:at] and moe[at:] == ["router", "experts"]


def test_waits_follow_the_previous_layer_and_the_kv_writes():
    graph = llama_graph()
    prefill = graph.names.index("prefill_attention")
    assert graph.waits(0, 0, 1, (), None) == []
    assert graph.waits(2, 0, 1, (), graph) == [(1, len(graph.ops) - 1, 1)]
    assert graph.waits(0, prefill, 2, (0, 1), None) == [
        (0, graph.kv_op, 2),
        (0, graph.kv_op, 0),
        (0, graph.kv_op, 1),
    ]


def test_an_op_may_only_wait_for_earlier_ops():
    with pytest.raises(ValueError, match="do not come before it"):
        LayerGraph((OpSpec("a", Resource.COMPUTE, after=("b",)), OpSpec("b", Resource.MEMORY)))


def test_kv_dependencies_link_nano_batches_sharing_a_prompt():
    assert kv_dependencies([["a"], ["a", "b"], [], ["b", "c"], ["a"]]) == [
        (),
        (0,),
        (),
        (1,),
        (0, 1),
    ]


def test_steady_state_assumes_every_prompt_boundary_cuts_a_prompt():
    shapes = [
        NanoBatchShape(4, 8),
        NanoBatchShape(4, 0),
        NanoBatchShape(4, 8),
        NanoBatchShape(4, 8),
    ]
    assert steady_kv_deps(shapes) == [(), (), (0,), (2,)]


def test_models_bind_their_architecture_graph():
    from nanoflow.distributed.parallel import ParallelGroup
    from nanoflow.models.loader import build_model
    from nanoflow.models.weights import dummy_weights

    cpu = torch.device("cpu")
    weights = dummy_weights(BUILTIN_SPEC, cpu, torch.float32, seed=0)
    model = build_model(BUILTIN_SPEC, weights, 4, 16, cpu, torch.float32, ParallelGroup())
    assert model.graph == llama_graph()
    assert [[op.spec for op in ops] for ops in model.layer_ops] == [list(model.graph.ops)] * len(
        model.layer_ops
    )


@pytest.mark.parametrize("order", list(LaunchOrder))
def test_cost_model_launches_what_the_executor_launches(order):
    """The same graph, schedule and nano-batches: the cost model's tasks are the executor's
    launches, in the executor's order."""
    import dataclasses

    tables = roofline_tables(BUILTIN_SPEC, "builtin")
    schedule = dataclasses.replace(shared_sm_schedule(132, num_nano_batches=2), launch_order=order)
    batch = SteadyBatch(decodes=4, prefill_tokens=6, decode_context=16, prompt_len=6)
    layers = 3
    tasks = build_tasks(tables, schedule, batch, layers)

    launched: list[tuple[int, str, int]] = []
    layer_ops = [
        [
            Op(spec, lambda b, nb, sms, L=layer, n=spec.name: launched.append((L, n, nb.index)))
            for spec in tables.graph.ops
        ]
        for layer in range(layers)
    ]
    nbs = [NanoBatch(0, 0, 5, 2, None, None, ()), NanoBatch(1, 5, 10, 2, None, None, (0,))]
    OverlappedExecutor(schedule, torch.device("cpu")).run(layer_ops, None, nbs)
    assert tables.graph == llama_graph()
    assert launched == [t.label for t in tasks]
