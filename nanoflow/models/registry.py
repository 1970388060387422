"""The published architectures we benchmark with dummy weights, as data (shapes from each model's
released ``config.json``)."""

from __future__ import annotations

from nanoflow.errors import ConfigError
from nanoflow.models.spec import ModelSpec, RopeScaling

_LLAMA3_ROPE = RopeScaling(
    factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=8192
)

KNOWN_MODELS: dict[str, ModelSpec] = {
    "llama-2-7b": ModelSpec(
        "llama", 32000, 4096, 11008, 32, 32, 32, 128, 4096, 1e-5, 10000.0,
        bos_token_id=1, eos_token_ids=(2,),
    ),
    "llama-2-13b": ModelSpec(
        "llama", 32000, 5120, 13824, 40, 40, 40, 128, 4096, 1e-5, 10000.0,
        bos_token_id=1, eos_token_ids=(2,),
    ),
    "llama-2-70b": ModelSpec(
        "llama", 32000, 8192, 28672, 80, 64, 8, 128, 4096, 1e-5, 10000.0,
        bos_token_id=1, eos_token_ids=(2,),
    ),
    "llama-3-8b": ModelSpec(
        "llama", 128256, 4096, 14336, 32, 32, 8, 128, 8192, 1e-5, 500000.0,
        bos_token_id=128000, eos_token_ids=(128001, 128009),
    ),
    "llama-3.1-8b": ModelSpec(
        "llama", 128256, 4096, 14336, 32, 32, 8, 128, 131072, 1e-5, 500000.0, _LLAMA3_ROPE,
        bos_token_id=128000, eos_token_ids=(128001, 128008, 128009),
    ),
    "llama-3-70b": ModelSpec(
        "llama", 128256, 8192, 28672, 80, 64, 8, 128, 8192, 1e-5, 500000.0,
        bos_token_id=128000, eos_token_ids=(128001, 128009),
    ),
    "mistral-7b": ModelSpec(
        "mistral", 32768, 4096, 14336, 32, 32, 8, 128, 32768, 1e-5, 1000000.0,
        bos_token_id=1, eos_token_ids=(2,),
    ),
    "qwen2-7b": ModelSpec(
        "qwen2", 152064, 3584, 18944, 28, 28, 4, 128, 32768, 1e-6, 1000000.0,
        qkv_bias=True, bos_token_id=151643, eos_token_ids=(151643,),
    ),
    "qwen2-72b": ModelSpec(
        "qwen2", 152064, 8192, 29568, 80, 64, 8, 128, 32768, 1e-6, 1000000.0,
        qkv_bias=True, bos_token_id=151643, eos_token_ids=(151643,),
    ),
    "mixtral-8x7b": ModelSpec(
        "mixtral", 32000, 4096, 14336, 32, 32, 8, 128, 32768, 1e-5, 1000000.0,
        bos_token_id=1, eos_token_ids=(2,), num_experts=8, num_experts_per_token=2,
    ),
}


def get_known_model(name: str) -> ModelSpec:
    try:
        return KNOWN_MODELS[name.lower()]
    except KeyError:
        raise ConfigError(
            f"unknown model {name!r}: give a checkpoint folder or one of {', '.join(KNOWN_MODELS)}"
        ) from None
