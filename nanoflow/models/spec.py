"""Model architecture as data: read from a Hugging Face ``config.json`` or taken from the
registry."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nanoflow.errors import ConfigError

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "mixtral")


@dataclass(frozen=True)
class RopeScaling:
    """Llama 3 style frequency scaling (``rope_type: llama3``); None of it means plain RoPE."""

    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_position_embeddings: int


@dataclass(frozen=True)
class ModelSpec:
    """Everything about a decoder-only model's shapes that the engine needs."""

    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_position_embeddings: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    qkv_bias: bool = False
    tie_word_embeddings: bool = False
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    num_experts: int = 0
    num_experts_per_token: int = 0
    sliding_window: int | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        if self.model_type not in SUPPORTED_MODEL_TYPES:
            raise ConfigError(
                f"model_type {self.model_type!r} is not supported; "
                f"nanoflow runs {', '.join(SUPPORTED_MODEL_TYPES)}"
            )
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(
                f"num_attention_heads ({self.num_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_kv_heads})"
            )

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    def num_parameters(self, active_only: bool = False) -> int:
        """Parameter count; with ``active_only`` MoE counts only the experts a token uses."""
        h, i = self.hidden_size, self.intermediate_size
        attn = h * (self.q_size + 2 * self.kv_size) + self.q_size * h
        experts = self.num_experts_per_token if active_only else self.num_experts
        mlp = 3 * h * i * (max(experts, 1)) + (h * self.num_experts if self.is_moe else 0)
        per_layer = attn + mlp + 2 * h
        embed = self.vocab_size * h * (1 if self.tie_word_embeddings else 2)
        return self.num_layers * per_layer + embed + h

    def params_per_token(self) -> int:
        """Weights each token multiplies through: what the optimal-throughput bound counts."""
        embed_lookup = self.vocab_size * self.hidden_size
        return self.num_parameters(active_only=True) - (
            0 if self.tie_word_embeddings else embed_lookup
        )

    def kv_bytes_per_token(self, dtype_bytes: int = 2) -> int:
        return 2 * self.num_layers * self.kv_size * dtype_bytes

    def architecture_hash(self) -> str:
        """A short stable digest of the shapes, for matching profiles to models."""
        shapes = dataclasses.asdict(self)
        for key in ("bos_token_id", "eos_token_ids", "sliding_window"):
            shapes.pop(key)
        text = json.dumps(shapes, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def to_hf_config(self) -> dict[str, Any]:
        """The ``config.json`` transformers would write for this architecture."""
        arch = {
            "llama": "LlamaForCausalLM",
            "mistral": "MistralForCausalLM",
            "qwen2": "Qwen2ForCausalLM",
            "mixtral": "MixtralForCausalLM",
        }[self.model_type]
        cfg: dict[str, Any] = {
            "architectures": [arch],
            "model_type": self.model_type,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "max_position_embeddings": self.max_position_embeddings,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "tie_word_embeddings": self.tie_word_embeddings,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": list(self.eos_token_ids) or None,
            "hidden_act": "silu",
        }
        if self.rope_scaling is not None:
            cfg["rope_scaling"] = {"rope_type": "llama3", **dataclasses.asdict(self.rope_scaling)}
        if self.model_type == "llama":
            cfg["attention_bias"] = self.qkv_bias
        if self.is_moe:
            cfg["num_local_experts"] = self.num_experts
            cfg["num_experts_per_tok"] = self.num_experts_per_token
        return cfg

    @classmethod
    def from_hf_config(cls, cfg: dict[str, Any]) -> ModelSpec:
        """Parse a Hugging Face ``config.json`` dict (transformers 4.x and 5.x layouts)."""
        try:
            model_type = cfg["model_type"]
            hidden = int(cfg["hidden_size"])
            heads = int(cfg["num_attention_heads"])
            rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
            rope_theta = float(rope.get("rope_theta", cfg.get("rope_theta", 10000.0)))
            return cls(
                model_type=model_type,
                vocab_size=int(cfg["vocab_size"]),
                hidden_size=hidden,
                intermediate_size=int(cfg["intermediate_size"]),
                num_layers=int(cfg["num_hidden_layers"]),
                num_heads=heads,
                num_kv_heads=int(cfg.get("num_key_value_heads") or heads),
                head_dim=int(cfg.get("head_dim") or hidden // heads),
                max_position_embeddings=int(cfg.get("max_position_embeddings", 4096)),
                rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-5)),
                rope_theta=rope_theta,
                rope_scaling=_parse_rope_scaling(rope),
                qkv_bias=model_type == "qwen2" or bool(cfg.get("attention_bias", False)),
                tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
                bos_token_id=cfg.get("bos_token_id"),
                eos_token_ids=_as_tuple(cfg.get("eos_token_id")),
                num_experts=int(cfg.get("num_local_experts", 0)),
                num_experts_per_token=int(cfg.get("num_experts_per_tok", 0)),
                sliding_window=cfg.get("sliding_window"),
            )
        except KeyError as exc:
            raise ConfigError(f"model config is missing the field {exc.args[0]!r}") from None
        except (TypeError, ValueError) as exc:
            if isinstance(exc, ConfigError):
                raise
            raise ConfigError(f"model config has a field of the wrong type: {exc}") from None

    @classmethod
    def from_pretrained(cls, path: str | Path) -> ModelSpec:
        config_path = Path(path) / "config.json"
        if not config_path.is_file():
            raise ConfigError(f"{path} has no config.json; is it a Hugging Face checkpoint folder?")
        try:
            cfg = json.loads(config_path.read_text())
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{config_path} is not valid JSON: {exc}") from None
        return cls.from_hf_config(cfg)


def _parse_rope_scaling(rope: dict[str, Any]) -> RopeScaling | None:
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type in (None, "default"):
        return None
    if rope_type != "llama3":
        raise ConfigError(f"rope_type {rope_type!r} is not supported (default and llama3 are)")
    return RopeScaling(
        factor=float(rope["factor"]),
        low_freq_factor=float(rope["low_freq_factor"]),
        high_freq_factor=float(rope["high_freq_factor"]),
        original_max_position_embeddings=int(rope["original_max_position_embeddings"]),
    )


def _as_tuple(value: Any) -> tuple[int, ...]:
    if value is None:
        return ()
    if isinstance(value, list | tuple):
        return tuple(int(v) for v in value)
    return (int(value),)
