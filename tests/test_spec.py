"""Model specs: parsing Hugging Face configs and the registry of published architectures."""

from __future__ import annotations

import pytest

from nanoflow.errors import ConfigError
from nanoflow.models.registry import KNOWN_MODELS, get_known_model
from nanoflow.models.spec import ModelSpec


@pytest.mark.parametrize(
    "name, billions",
    [
        ("llama-2-7b", 6.74),
        ("llama-2-70b", 68.98),
        ("llama-3-8b", 8.03),
        ("mistral-7b", 7.24),
        ("qwen2-7b", 7.62),
        ("qwen2-72b", 72.71),
        ("mixtral-8x7b", 46.70),
    ],
)
def test_registry_parameter_counts_match_the_published_models(name, billions):
    assert get_known_model(name).num_parameters() / 1e9 == pytest.approx(billions, abs=0.01)


def test_mixtral_active_parameters():
    spec = get_known_model("mixtral-8x7b")
    assert spec.num_parameters(active_only=True) / 1e9 == pytest.approx(12.88, abs=0.02)


@pytest.mark.parametrize("name", sorted(KNOWN_MODELS))
def test_hf_config_round_trip(name):
    spec = KNOWN_MODELS[name]
    assert ModelSpec.from_hf_config(spec.to_hf_config()) == spec


def test_transformers_5_rope_parameters_layout():
    cfg = get_known_model("llama-3.1-8b").to_hf_config()
    scaling = cfg.pop("rope_scaling")
    cfg["rope_parameters"] = {**scaling, "rope_theta": cfg.pop("rope_theta")}
    assert ModelSpec.from_hf_config(cfg) == get_known_model("llama-3.1-8b")


def test_architecture_hash_ignores_token_ids_but_not_shapes():
    spec = get_known_model("llama-3-8b")
    import dataclasses

    assert (
        dataclasses.replace(spec, eos_token_ids=(1,)).architecture_hash()
        == spec.architecture_hash()
    )
    assert dataclasses.replace(spec, num_layers=31).architecture_hash() != spec.architecture_hash()


def test_bad_specs():
    with pytest.raises(ConfigError, match="multiple"):
        dataclasses_replace_heads()
    with pytest.raises(ConfigError, match="missing the field 'hidden_size'"):
        ModelSpec.from_hf_config({"model_type": "llama"})
    with pytest.raises(ConfigError, match="rope_type"):
        cfg = get_known_model("llama-3-8b").to_hf_config()
        cfg["rope_scaling"] = {"rope_type": "yarn", "factor": 4.0}
        ModelSpec.from_hf_config(cfg)


def dataclasses_replace_heads() -> None:
    import dataclasses

    dataclasses.replace(get_known_model("llama-3-8b"), num_kv_heads=5)
