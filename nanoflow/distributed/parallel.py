"""Tensor parallelism: how weights are sharded over a group of ranks and the collectives that
join the shards (Megatron-style column/row parallel layers, vocabulary-parallel embedding and
LM head)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F

from nanoflow.errors import ConfigError
from nanoflow.models.spec import ModelSpec


@dataclass
class ParallelGroup:
    """This rank's place in its tensor-parallel group; size 1 means no parallelism."""

    rank: int = 0
    size: int = 1
    process_group: Any = None

    def check(self, spec: ModelSpec) -> None:
        for what, count in (
            ("num_key_value_heads", spec.num_kv_heads),
            ("num_attention_heads", spec.num_heads),
            ("intermediate_size", spec.intermediate_size),
            ("vocab_size", spec.vocab_size),
        ):
            if count % self.size:
                raise ConfigError(
                    f"tensor-parallel size {self.size} does not divide {what} ({count})"
                )

    def _part(self, t: torch.Tensor, dim: int) -> torch.Tensor:
        return t.chunk(self.size, dim=dim)[self.rank].contiguous()

    def shard_weights(self, spec: ModelSpec, w: dict[str, torch.Tensor]) -> dict[Any, Any]:
        """Fuse QKV and gate-up and keep this rank's shard; consumes ``w`` to free memory early.

        Returns ``{layer_index: layer weights, "embed", "lm_head", "final_norm"}``.
        """
        self.check(spec)
        out: dict[Any, Any] = {}
        for i in range(spec.num_layers):
            p = f"model.layers.{i}."
            qkv = [self._part(w.pop(f"{p}self_attn.{n}_proj.weight"), 0) for n in "qkv"]
            layer = {
                "input_norm": w.pop(p + "input_layernorm.weight"),
                "post_norm": w.pop(p + "post_attention_layernorm.weight"),
                "qkv": torch.cat(qkv),
                "o": self._part(w.pop(p + "self_attn.o_proj.weight"), 1),
            }
            if spec.qkv_bias:
                layer["qkv_bias"] = torch.cat(
                    [self._part(w.pop(f"{p}self_attn.{n}_proj.bias"), 0) for n in "qkv"]
                )
            if spec.is_moe:
                out[i] = layer | self._shard_experts(spec, w, p + "block_sparse_moe.")
                continue
            gate = self._part(w.pop(p + "mlp.gate_proj.weight"), 0)
            up = self._part(w.pop(p + "mlp.up_proj.weight"), 0)
            layer["gate_up"] = torch.cat([gate, up])
            layer["down"] = self._part(w.pop(p + "mlp.down_proj.weight"), 1)
            out[i] = layer
        embed = w.pop("model.embed_tokens.weight")
        lm_head = w.pop("lm_head.weight", embed)
        out["embed"] = self._part(embed, 0)
        out["lm_head"] = out["embed"] if lm_head is embed else self._part(lm_head, 0)
        out["final_norm"] = w.pop("model.norm.weight")
        return out

    def _shard_experts(
        self, spec: ModelSpec, w: dict[str, torch.Tensor], p: str
    ) -> dict[str, torch.Tensor]:
        """Each expert split like the dense MLP (w1/w3 by rows, w2 by columns), so the MoE output
        is a partial sum that the same all-reduce joins; the router is replicated.

        Returns ``router`` ``[E, h]``, ``w13`` ``[E, 2*I/tp, h]`` (gate rows then up rows) and
        ``w2`` ``[E, h, I/tp]``, the layouts the fused MoE kernel reads.
        """
        inter, h = spec.intermediate_size // self.size, spec.hidden_size
        like = w[f"{p}experts.0.w1.weight"]
        w13 = like.new_empty(spec.num_experts, 2 * inter, h)
        w2 = like.new_empty(spec.num_experts, h, inter)
        for e in range(spec.num_experts):
            q = f"{p}experts.{e}."
            w13[e, :inter] = self._part(w.pop(q + "w1.weight"), 0)
            w13[e, inter:] = self._part(w.pop(q + "w3.weight"), 0)
            w2[e] = self._part(w.pop(q + "w2.weight"), 1)
        return {"router": w.pop(p + "gate.weight"), "w13": w13, "w2": w2}

    def all_reduce(self, t: torch.Tensor) -> None:
        if self.size > 1:
            dist.all_reduce(t, group=self.process_group)

    def embed(self, ids: torch.Tensor, weight: torch.Tensor, out: torch.Tensor) -> None:
        if self.size == 1:
            torch.index_select(weight, 0, ids, out=out)
            return
        rows = weight.shape[0]
        local = ids - self.rank * rows
        inside = (local >= 0) & (local < rows)
        out.copy_(F.embedding(local.clamp(0, rows - 1), weight) * inside.unsqueeze(1))
        self.all_reduce(out)

    def lm_head(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        local = F.linear(x, weight)
        if self.size == 1:
            return local
        parts = [torch.empty_like(local) for _ in range(self.size)]
        dist.all_gather(parts, local, group=self.process_group)
        return torch.cat(parts, dim=-1)
