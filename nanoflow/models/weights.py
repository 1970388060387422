"""Checkpoint loading: Hugging Face safetensors (single file or sharded) or random "dummy" weights
of the real shapes, straight to the target device and dtype."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from nanoflow.errors import CheckpointError
from nanoflow.models.quantization import (
    FP8_DTYPE,
    SCALE_SUFFIXES,
    Weight,
    checkpoint_fp8,
    join_fp8,
    quantize_linears,
)
from nanoflow.models.spec import ModelSpec

logger = logging.getLogger(__name__)


def expected_shapes(spec: ModelSpec) -> dict[str, tuple[int, ...]]:
    """Every tensor a Hugging Face checkpoint of this architecture holds, with its shape."""
    h, d = spec.hidden_size, spec.head_dim
    shapes: dict[str, tuple[int, ...]] = {
        "model.embed_tokens.weight": (spec.vocab_size, h),
        "model.norm.weight": (h,),
    }
    if not spec.tie_word_embeddings:
        shapes["lm_head.weight"] = (spec.vocab_size, h)
    for i in range(spec.num_layers):
        p = f"model.layers.{i}."
        shapes[p + "input_layernorm.weight"] = (h,)
        shapes[p + "post_attention_layernorm.weight"] = (h,)
        shapes[p + "self_attn.q_proj.weight"] = (spec.num_heads * d, h)
        shapes[p + "self_attn.k_proj.weight"] = (spec.num_kv_heads * d, h)
        shapes[p + "self_attn.v_proj.weight"] = (spec.num_kv_heads * d, h)
        shapes[p + "self_attn.o_proj.weight"] = (h, spec.num_heads * d)
        if spec.qkv_bias:
            shapes[p + "self_attn.q_proj.bias"] = (spec.num_heads * d,)
            shapes[p + "self_attn.k_proj.bias"] = (spec.num_kv_heads * d,)
            shapes[p + "self_attn.v_proj.bias"] = (spec.num_kv_heads * d,)
        if spec.is_moe:
            shapes[p + "block_sparse_moe.gate.weight"] = (spec.num_experts, h)
            for e in range(spec.num_experts):
                q = f"{p}block_sparse_moe.experts.{e}."
                shapes[q + "w1.weight"] = (spec.intermediate_size, h)
                shapes[q + "w3.weight"] = (spec.intermediate_size, h)
                shapes[q + "w2.weight"] = (h, spec.intermediate_size)
        else:
            shapes[p + "mlp.gate_proj.weight"] = (spec.intermediate_size, h)
            shapes[p + "mlp.up_proj.weight"] = (spec.intermediate_size, h)
            shapes[p + "mlp.down_proj.weight"] = (h, spec.intermediate_size)
    return shapes


def _shard_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as exc:
            raise CheckpointError(f"{index} is not a valid safetensors index: {exc!r}") from None
        files = sorted({path / f for f in weight_map.values()})
    else:
        files = sorted(path.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"no *.safetensors files in {path}")
    for f in files:
        if not f.is_file():
            raise CheckpointError(f"checkpoint shard {f.name} named by the index is missing")
    return files


def _iter_tensors(files: list[Path], device: torch.device) -> Iterator[tuple[str, torch.Tensor]]:
    load_device = str(device) if device.type == "cuda" else "cpu"
    for f in files:
        try:
            with safe_open(str(f), framework="pt", device=load_device) as handle:
                for name in handle.keys():  # noqa: SIM118 (safe_open is not a dict)
                    yield name, handle.get_tensor(name)
        except (SafetensorError, OSError, RuntimeError) as exc:
            raise CheckpointError(f"cannot read {f.name}: {exc} (truncated or corrupt?)") from None


def load_safetensors(
    spec: ModelSpec, path: str | Path, device: torch.device, dtype: torch.dtype
) -> dict[str, Weight]:
    """All tensors of a checkpoint folder, checked against the architecture's expected shapes.

    An FP8 checkpoint (``quantization_config`` in its config.json) keeps its e4m3 GEMM weights
    with their scales, and its unquantized GEMM weights are quantized like theirs."""
    expected = expected_shapes(spec)
    fp8 = checkpoint_fp8(Path(path))
    weights: dict[str, torch.Tensor] = {}
    scales: dict[str, torch.Tensor] = {}
    for name, tensor in _iter_tensors(_shard_files(Path(path)), device):
        if fp8 is not None and name.endswith(SCALE_SUFFIXES):
            scales[name] = tensor.to(device)
            continue
        if name not in expected:
            if "rotary_emb" not in name:
                logger.warning("ignoring tensor %s, which the architecture does not use", name)
            continue
        if tuple(tensor.shape) != expected[name]:
            raise CheckpointError(
                f"tensor {name} has shape {tuple(tensor.shape)}, expected {expected[name]}"
            )
        keep = fp8 is not None and tensor.dtype == FP8_DTYPE
        weights[name] = tensor.to(device=device, dtype=None if keep else dtype)
    missing = [n for n in expected if n not in weights]
    if missing:
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        raise CheckpointError(f"checkpoint {path} lacks tensor {missing[0]}{more}")
    if fp8 is None:
        return weights  # type: ignore[return-value]
    return quantize_linears(join_fp8(weights, scales))


def dummy_weights(
    spec: ModelSpec, device: torch.device, dtype: torch.dtype, seed: int = 0
) -> dict[str, torch.Tensor]:
    """Random weights of the real shapes, made on the device (seconds for an 8B model on a GPU).

    Norm weights are ones and the rest small normals, so activations stay finite at any depth.
    """
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    weights = {}
    for name, shape in expected_shapes(spec).items():
        if name.endswith("layernorm.weight") or name == "model.norm.weight":
            weights[name] = torch.ones(shape, device=device, dtype=dtype)
        else:
            t = torch.empty(shape, device=device, dtype=dtype)
            weights[name] = t.normal_(0.0, 0.02, generator=gen)
    return weights
