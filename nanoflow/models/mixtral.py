"""Mixtral (sparse mixture of experts): the kernels of ``mixtral_graph``, Llama's attention ops
then two MoE ops where the dense MLP's gate-up / SiLU-mul / down were.

* ``router`` (compute): the gate GEMM, softmax, top-k and renormalisation, exactly as
  transformers' ``MixtralTopKRouter`` does them (softmax in float32, weights renormalised over
  the chosen experts).
* ``experts`` (compute): the fused MoE kernel, a grouped GEMM over the nano-batch's
  (token, expert) pairs sorted by expert, writing the weighted sum into the hidden rows.

Both work on one nano-batch's rows, like the dense GEMMs, so the pipeline schedules them the
same way. With tensor parallelism each expert is sharded like the dense MLP and the same
``mlp_all_reduce`` follows.
"""

from __future__ import annotations

import torch

from nanoflow import kernels
from nanoflow.distributed.parallel import ParallelGroup
from nanoflow.models.llama import DecoderLayer, LlamaModel
from nanoflow.models.spec import ModelSpec
from nanoflow.runtime.batch import NanoBatch, StepBuffers
from nanoflow.runtime.graph import mixtral_graph
from nanoflow.runtime.ops import bind


def route_topk(
    logits: torch.Tensor, top_k: int, weights_out: torch.Tensor, ids_out: torch.Tensor
) -> None:
    """Mixtral's routing: top-k of the softmax (float32), renormalised to sum to one."""
    probs = torch.softmax(logits.float(), dim=-1)
    top, ids = torch.topk(probs, top_k, dim=-1)
    torch.div(top, top.sum(dim=-1, keepdim=True), out=weights_out)
    ids_out.copy_(ids)


class Routing:
    """Each token's chosen experts and weights, from the router op to the experts op.

    One buffer serves every layer: a nano-batch's ops run in order and its rows are its own, so
    layer ``i + 1``'s router never overwrites what layer ``i``'s experts still need. It is sized
    to the runner's step buffers when the first step embeds (the model is built before it knows
    the token budget).
    """

    def __init__(self, top_k: int, device: torch.device) -> None:
        self.top_k = top_k
        self.device = device
        self.weights = torch.empty(0, top_k, device=device)
        self.ids = torch.empty(0, top_k, device=device, dtype=torch.int64)

    def fit(self, rows: int) -> None:
        if self.weights.shape[0] < rows:
            self.weights = torch.empty(rows, self.top_k, device=self.device)
            self.ids = torch.empty(rows, self.top_k, device=self.device, dtype=torch.int64)


class MixtralDecoderLayer(DecoderLayer):
    """A Llama layer with ``router`` and ``experts`` for the ops of ``mixtral_graph``'s MLP."""

    def __init__(
        self,
        spec: ModelSpec,
        weights: dict[str, torch.Tensor],
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        cos_sin: torch.Tensor,
        group: ParallelGroup,
        routing: Routing,
    ) -> None:
        super().__init__(spec, weights, k_cache, v_cache, cos_sin, group)
        self.routing = routing

    def router(self, b: StepBuffers, nb: NanoBatch, sms: int | None) -> None:
        rows = slice(nb.start, nb.end)
        logits = kernels.linear(b.normed[rows], self.w["router"], None, sms)
        route_topk(logits, self.routing.top_k, self.routing.weights[rows], self.routing.ids[rows])

    def experts(self, b: StepBuffers, nb: NanoBatch, sms: int | None) -> None:
        rows = slice(nb.start, nb.end)
        kernels.fused_moe(
            b.normed[rows],
            self.w["w13"],
            self.w["w2"],
            self.routing.weights[rows],
            self.routing.ids[rows],
            sms,
            b.hidden[rows],
        )


class MixtralModel(LlamaModel):
    """LlamaModel with Mixtral layers over the same weights and KV caches."""

    def __init__(
        self,
        spec: ModelSpec,
        weights: dict[str, torch.Tensor],
        num_blocks: int,
        block_size: int,
        device: torch.device,
        dtype: torch.dtype,
        group: ParallelGroup,
        kv_dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(spec, weights, num_blocks, block_size, device, dtype, group, kv_dtype)
        self.routing = Routing(spec.num_experts_per_token, device)
        self.layers = [
            MixtralDecoderLayer(
                spec, dense.w, dense.k_cache, dense.v_cache, dense.cos_sin, group, self.routing
            )
            for dense in self.layers
        ]
        self.graph = mixtral_graph(tensor_parallel=group.size > 1)
        self.layer_ops = [bind(self.graph, layer) for layer in self.layers]

    def embed(self, input_ids: torch.Tensor, buffers: StepBuffers) -> None:
        self.routing.fit(buffers.hidden.shape[0])
        super().embed(input_ids, buffers)
