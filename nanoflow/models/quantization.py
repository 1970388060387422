"""FP8 (W8A8) weights: which checkpoint tensors are quantized, per-output-channel e4m3 scales
computed at load time, and the FP8 checkpoint formats read from Hugging Face (``quant_method``
``fp8`` as vLLM and transformers write it, and compressed-tensors FP8).

Activations always get dynamic per-token scales: a checkpoint's static ``input_scale`` is read
and dropped, since a scale per token is at least as accurate as one per tensor.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from nanoflow.distributed.parallel import ParallelGroup
from nanoflow.errors import CheckpointError
from nanoflow.kernels.fp8_linear import FP8_DTYPE, Fp8Weight, quantize_weight

logger = logging.getLogger(__name__)

# the GEMM weights, dense layers' and MoE experts'; embeddings, norms, the router and the LM head
# stay unquantized
_LINEARS = (
    "self_attn.q_proj.weight",
    "self_attn.k_proj.weight",
    "self_attn.v_proj.weight",
    "self_attn.o_proj.weight",
    "mlp.gate_proj.weight",
    "mlp.up_proj.weight",
    "mlp.down_proj.weight",
)
_EXPERT_LINEARS = (".w1.weight", ".w2.weight", ".w3.weight")
SCALE_SUFFIXES = ("weight_scale", "weight_scale_inv", "input_scale")

Weight = torch.Tensor | Fp8Weight


def effective_quantization(quantization: str | None, checkpoint: Path | None) -> str | None:
    """What the engine runs: the quantization asked for, else the checkpoint's own."""
    if quantization is not None:
        return quantization
    return "fp8" if checkpoint_fp8(checkpoint) is not None else None


def is_quantized_linear(name: str) -> bool:
    if not name.startswith("model.layers."):
        return False
    expert = ".block_sparse_moe.experts." in name and name.endswith(_EXPERT_LINEARS)
    return expert or name.endswith(_LINEARS)


def quantize_linears(weights: dict[str, Weight]) -> dict[str, Weight]:
    """Every dense GEMM weight still in floating point as an :class:`Fp8Weight`, one at a time
    (the unquantized tensor is freed before the next)."""
    for name in [n for n, w in weights.items() if is_quantized_linear(n)]:
        if isinstance(weights[name], torch.Tensor):
            weights[name] = quantize_weight(weights.pop(name))
    return weights


def part(group: ParallelGroup, w: Weight, dim: int) -> Weight:
    """``group.part`` of a weight: the rows of an FP8 weight keep their scales; a column cut
    keeps every row, so every scale."""
    if isinstance(w, torch.Tensor):
        return group.part(w, dim)
    scale = group.part(w.scale, 0) if dim == 0 else w.scale
    return Fp8Weight(group.part(w.data, dim), scale)


def _join(ws: list[Weight], join: Any, mixed: str) -> Weight:
    """``join`` (``torch.cat`` or ``torch.stack``) of plain weights, or of FP8 weights' data and
    scales alike; refuses a mix, saying ``mixed``."""
    if all(isinstance(w, torch.Tensor) for w in ws):
        return join(ws)
    if not all(isinstance(w, Fp8Weight) for w in ws):
        raise CheckpointError(mixed)
    return Fp8Weight(join([w.data for w in ws]), join([w.scale for w in ws]))


def cat(ws: list[Weight]) -> Weight:
    """Row-wise concatenation (the fused QKV and gate-up weights)."""
    return _join(ws, torch.cat, "a fused weight mixes FP8 and unquantized parts")


def stack(ws: list[Weight]) -> Weight:
    """The experts' weights as one ``[E, N, K]`` stack (FP8 scales ``[E, N]``)."""
    return _join(ws, torch.stack, "the experts of one layer mix FP8 and unquantized weights")


def flat_tensors(weights: dict[str, Weight]) -> dict[str, torch.Tensor]:
    """A layer's weights as plain tensors (an FP8 weight as ``name.data`` and ``name.scale``),
    for packing into one buffer."""
    out: dict[str, torch.Tensor] = {}
    for name, w in weights.items():
        if isinstance(w, Fp8Weight):
            out[name + ".data"], out[name + ".scale"] = w.data, w.scale
        else:
            out[name] = w
    return out


def from_flat(tensors: dict[str, torch.Tensor]) -> dict[str, Weight]:
    """The inverse of :func:`flat_tensors`."""
    out: dict[str, Weight] = {}
    for name, t in tensors.items():
        if name.endswith(".scale"):
            continue
        if name.endswith(".data"):
            base = name.removesuffix(".data")
            out[base] = Fp8Weight(t, tensors[base + ".scale"])
        else:
            out[name] = t
    return out


@dataclass(frozen=True)
class CheckpointFp8:
    """A checkpoint whose dense GEMM weights are e4m3 with a scale beside each (layers it left
    unquantized are quantized at load time, like a bf16 checkpoint's)."""

    quant_method: str


def _unsupported(field: str, value: Any, what: str) -> CheckpointError:
    return CheckpointError(
        f"quantization_config.{field} = {value!r}: {what}; nanoflow reads FP8 (e4m3) weights "
        "with per-tensor or per-channel scales, or quantizes an unquantized checkpoint itself "
        "(--quantization fp8)"
    )


def _fp8_method(qc: dict[str, Any]) -> CheckpointFp8:
    if qc.get("weight_block_size") is not None:
        raise _unsupported(
            "weight_block_size", qc["weight_block_size"], "block-wise scales are not supported"
        )
    fmt = qc.get("fmt", "e4m3")
    if fmt != "e4m3":
        raise _unsupported("fmt", fmt, "only e4m3 weights are supported")
    scheme = qc.get("activation_scheme", "dynamic")
    if scheme not in ("dynamic", "static"):
        raise _unsupported("activation_scheme", scheme, "unknown activation scheme")
    return CheckpointFp8("fp8")


def _check_float8(path: str, args: dict[str, Any], strategies: tuple[str, ...]) -> None:
    if args.get("num_bits") != 8 or args.get("type", "float") != "float":
        raise _unsupported(
            f"{path}.num_bits/type",
            (args.get("num_bits"), args.get("type")),
            "only 8-bit float is supported (not int8 or 4-bit)",
        )
    if args.get("strategy") not in strategies:
        raise _unsupported(f"{path}.strategy", args.get("strategy"), "not supported")
    if args.get("symmetric", True) is not True:
        raise _unsupported(f"{path}.symmetric", args.get("symmetric"), "only symmetric scales")


def _compressed_tensors(qc: dict[str, Any]) -> CheckpointFp8:
    fmt = qc.get("format", "float-quantized")
    if fmt not in ("float-quantized", "naive-quantized"):
        raise _unsupported("format", fmt, "only float-quantized FP8 is supported")
    groups = qc.get("config_groups") or {}
    if not groups:
        raise _unsupported("config_groups", groups, "no quantization group")
    for key, group in groups.items():
        path = f"config_groups.{key}"
        _check_float8(f"{path}.weights", group.get("weights") or {}, ("tensor", "channel"))
        acts = group.get("input_activations")
        if acts is not None:
            _check_float8(f"{path}.input_activations", acts, ("tensor", "token"))
        if group.get("output_activations") is not None:
            raise _unsupported(
                f"{path}.output_activations", "...", "quantized outputs are not supported"
            )
    return CheckpointFp8("compressed-tensors")


def checkpoint_fp8(path: Path | None) -> CheckpointFp8 | None:
    """The FP8 scheme of a checkpoint's ``config.json`` (None: an unquantized checkpoint);
    a scheme nanoflow cannot run raises :class:`CheckpointError` naming the field."""
    if path is None or not (path / "config.json").is_file():
        return None
    qc = json.loads((path / "config.json").read_text()).get("quantization_config")
    if qc is None:
        return None
    method = qc.get("quant_method")
    if method == "fp8":
        return _fp8_method(qc)
    if method == "compressed-tensors":
        return _compressed_tensors(qc)
    raise _unsupported("quant_method", method, "only fp8 and compressed-tensors FP8 are read")


def _per_channel(scale: torch.Tensor, rows: int, name: str) -> torch.Tensor:
    scale = scale.float().flatten()
    if scale.numel() == 1:
        return scale.expand(rows).contiguous()
    if scale.numel() == rows:
        return scale.contiguous()
    raise CheckpointError(
        f"{name} has {scale.numel()} values: expected one (per tensor) or {rows} (per channel)"
    )


def join_fp8(
    weights: dict[str, torch.Tensor], scales: dict[str, torch.Tensor]
) -> dict[str, Weight]:
    """Pair each e4m3 checkpoint weight with its scale (expanded to one per output channel):
    ``weight_scale``, or ``weight_scale_inv`` as transformers names it (both multiply)."""
    out: dict[str, Weight] = {}
    for name, w in weights.items():
        if w.dtype != FP8_DTYPE:
            out[name] = w
            continue
        if not is_quantized_linear(name):
            raise CheckpointError(f"tensor {name} is FP8; nanoflow reads FP8 GEMM weights only")
        base = name.removesuffix("weight")
        scale_name = next((base + s for s in SCALE_SUFFIXES[:2] if base + s in scales), None)
        if scale_name is None:
            raise CheckpointError(f"FP8 tensor {name} has no {base}weight_scale beside it")
        out[name] = Fp8Weight(w, _per_channel(scales[scale_name], w.shape[0], scale_name))
    return out
