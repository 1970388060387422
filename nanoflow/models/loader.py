"""From a model name or folder to a ready model: resolve the spec, load or make the weights."""

from __future__ import annotations

from pathlib import Path

import torch

from nanoflow.distributed.parallel import ParallelGroup
from nanoflow.errors import ConfigError
from nanoflow.models.builtin import BUILTIN_NAME, builtin_model_path
from nanoflow.models.llama import LlamaModel
from nanoflow.models.mixtral import MixtralModel
from nanoflow.models.offload import load_split_weights
from nanoflow.models.quantization import Weight, quantize_linears
from nanoflow.models.registry import KNOWN_MODELS, get_known_model
from nanoflow.models.spec import ModelSpec
from nanoflow.models.weights import dummy_weights, load_safetensors


def resolve_model(name_or_path: str) -> tuple[ModelSpec, Path | None]:
    """The architecture and, when there is one, the checkpoint folder of a model argument."""
    if name_or_path == BUILTIN_NAME:
        path = builtin_model_path()
        return ModelSpec.from_pretrained(path), path
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return ModelSpec.from_pretrained(path), path
    if name_or_path.lower() in KNOWN_MODELS:
        return get_known_model(name_or_path), None
    if path.exists():
        raise ConfigError(f"{name_or_path} is a file; give the checkpoint's folder")
    raise ConfigError(
        f"unknown model {name_or_path!r}: give a checkpoint folder, 'builtin', or one of "
        f"{', '.join(KNOWN_MODELS)} (with load_format='dummy')"
    )


def load_weights(
    spec: ModelSpec,
    path: Path | None,
    load_format: str,
    device: torch.device,
    dtype: torch.dtype,
    seed: int,
    host_layers: tuple[int, ...] = (),
    quantization: str | None = None,
) -> dict[str, Weight]:
    """Every tensor on ``device``, except the ``host_layers``' (weight offload) in host memory;
    with ``quantization="fp8"`` the dense GEMM weights as e4m3 with per-channel scales."""
    weights: dict[str, Weight]
    if host_layers and (load_format == "dummy" or path is not None):
        weights = load_split_weights(spec, path, load_format, device, dtype, seed, host_layers)
    elif load_format == "dummy":
        weights = dummy_weights(spec, device, dtype, seed)  # type: ignore[assignment]
    elif path is None:
        raise ConfigError(
            "a registry model name has no checkpoint: pass load_format='dummy' "
            "(--load-format dummy) or a checkpoint folder"
        )
    else:
        weights = load_safetensors(spec, path, device, dtype)
    return quantize_linears(weights) if quantization == "fp8" else weights


def build_model(
    spec: ModelSpec,
    weights: dict[str, torch.Tensor],
    num_blocks: int,
    block_size: int,
    device: torch.device,
    dtype: torch.dtype,
    group: ParallelGroup,
    kv_dtype: torch.dtype | None = None,
) -> LlamaModel:
    """The model over ``weights`` with KV caches of ``num_blocks`` blocks (of ``kv_dtype``,
    by default the model's dtype)."""
    model = MixtralModel if spec.is_moe else LlamaModel
    return model(spec, weights, num_blocks, block_size, device, dtype, group, kv_dtype)
