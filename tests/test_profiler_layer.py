"""The profiler's one-layer bench on CPU: every op of a dense and of a MoE layer runs on its
synthetic nano-batches (a MoE layer's experts read routing the bench filled), and each class
pair of the interference probes maps to ops the layer has."""

from __future__ import annotations

import pytest
import torch

from nanoflow.autotune.profiler import LayerBench, pair_ops
from nanoflow.models.spec import ModelSpec
from nanoflow.runtime.graph import DECODE_ATTENTION, PREFILL_ATTENTION


def _spec(**moe: int) -> ModelSpec:
    return ModelSpec(
        model_type="mixtral" if moe else "llama", vocab_size=128, hidden_size=64,
        intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16,
        max_position_embeddings=4096, **moe,
    )  # fmt: skip


@pytest.mark.timeout(300)
@pytest.mark.parametrize("moe", [False, True], ids=["dense", "mixtral"])
def test_every_op_of_the_layer_runs_on_the_bench(moe: bool) -> None:
    spec = _spec(num_experts=4, num_experts_per_token=2) if moe else _spec()
    bench = LayerBench(spec, torch.device("cpu"), torch.float32)
    names = [op.name for op in bench.ops]
    assert ("experts" in names) == moe
    for op in bench.ops:
        nb = bench.nano_batch(op.spec.rows, 64, 256)
        op.fn(bench.buffers, nb, None)
    assert torch.isfinite(bench.buffers.hidden[:64]).all()
    pairs = pair_ops(names)
    assert set(pairs) == {"compute+memory", "memory+memory", "compute+compute"}
    mlp = "experts" if moe else "gate_up_proj"
    assert pairs["compute+memory"] == ((mlp, 2048, 0), (DECODE_ATTENTION, 256, 1024))
    assert pairs["compute+compute"][1][0] == PREFILL_ATTENTION
    assert pairs["memory+memory"][0][0] == ("post_attn_norm" if moe else "silu_mul")


def test_a_pair_whose_side_the_layer_lacks_is_left_out() -> None:
    assert pair_ops(["qkv_proj", "o_proj"]) == {}
