"""How a checkpoint's weights are cut over a tensor-parallel group: QKV and gate-up fused and
split by rows, O and down by columns, each expert like the dense MLP, the vocabulary split for
the embedding and LM head."""

from __future__ import annotations

from typing import Any

import torch

from nanoflow.distributed.parallel import ParallelGroup
from nanoflow.errors import ConfigError
from nanoflow.models.quantization import Weight, cat, part, stack
from nanoflow.models.spec import ModelSpec


def check_divisible(group: ParallelGroup, spec: ModelSpec) -> None:
    """Refuse a group size that would cut a head, a row of the MLP or the vocabulary unevenly."""
    for what, count in (
        ("num_key_value_heads", spec.num_kv_heads),
        ("num_attention_heads", spec.num_heads),
        ("intermediate_size", spec.intermediate_size),
        ("vocab_size", spec.vocab_size),
    ):
        if count % group.size:
            raise ConfigError(f"tensor-parallel size {group.size} does not divide {what} ({count})")


def shard_weights(group: ParallelGroup, spec: ModelSpec, w: dict[str, Weight]) -> dict[Any, Any]:
    """Fuse QKV and gate-up and keep this rank's shard (an FP8 weight with its scales);
    consumes ``w`` to free memory early.

    Returns ``{layer_index: layer weights, "embed", "lm_head", "final_norm"}``.
    """
    check_divisible(group, spec)
    out: dict[Any, Any] = {}
    for i in range(spec.num_layers):
        p = f"model.layers.{i}."
        qkv = [part(group, w.pop(f"{p}self_attn.{n}_proj.weight"), 0) for n in "qkv"]
        layer = {
            "input_norm": w.pop(p + "input_layernorm.weight"),
            "post_norm": w.pop(p + "post_attention_layernorm.weight"),
            "qkv": cat(qkv),
            "o": part(group, w.pop(p + "self_attn.o_proj.weight"), 1),
        }
        if spec.qkv_bias:
            layer["qkv_bias"] = torch.cat(
                [group.part(w.pop(f"{p}self_attn.{n}_proj.bias"), 0) for n in "qkv"]
            )
        if spec.is_moe:
            out[i] = layer | _shard_experts(group, spec, w, p + "block_sparse_moe.")
            continue
        gate = part(group, w.pop(p + "mlp.gate_proj.weight"), 0)
        up = part(group, w.pop(p + "mlp.up_proj.weight"), 0)
        layer["gate_up"] = cat([gate, up])
        layer["down"] = part(group, w.pop(p + "mlp.down_proj.weight"), 1)
        out[i] = layer
    embed = w.pop("model.embed_tokens.weight")
    lm_head = w.pop("lm_head.weight", embed)
    out["embed"] = group.part(embed, 0)
    out["lm_head"] = out["embed"] if lm_head is embed else group.part(lm_head, 0)
    out["final_norm"] = w.pop("model.norm.weight")
    return out


def _shard_experts(
    group: ParallelGroup, spec: ModelSpec, w: dict[str, Weight], p: str
) -> dict[str, Weight]:
    """Each expert split like the dense MLP (w1/w3 by rows, w2 by columns), so the MoE output
    is a partial sum that the same all-reduce joins; the router is replicated.

    Returns ``router`` ``[E, h]``, ``w13`` ``[E, 2*I/tp, h]`` (gate rows then up rows) and
    ``w2`` ``[E, h, I/tp]`` (FP8 experts as stacks with their scales), the layouts the MoE
    kernels read.
    """
    w13, w2 = [], []
    for e in range(spec.num_experts):
        q = f"{p}experts.{e}."
        gate = part(group, w.pop(q + "w1.weight"), 0)
        w13.append(cat([gate, part(group, w.pop(q + "w3.weight"), 0)]))
        w2.append(part(group, w.pop(q + "w2.weight"), 1))
    return {"router": w.pop(p + "gate.weight"), "w13": stack(w13), "w2": stack(w2)}
