"""Rotary tables against transformers' own rotary embedding: plain RoPE, and Llama 3's frequency
scaling for long contexts."""

from __future__ import annotations

import math

import pytest
import torch
import transformers
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

from nanoflow.models.rope import cos_sin_cache, inverse_frequencies
from nanoflow.models.spec import ModelSpec

LLAMA3 = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 64,
}


def hf_config(theta: float, scaling: dict | None) -> transformers.LlamaConfig:
    kwargs = {"rope_scaling": scaling} if scaling else {}
    return transformers.LlamaConfig(
        hidden_size=128,
        num_attention_heads=2,
        num_key_value_heads=1,
        intermediate_size=256,
        num_hidden_layers=1,
        vocab_size=64,
        max_position_embeddings=512,
        rope_theta=theta,
        **kwargs,
    )


@pytest.mark.parametrize(("theta", "scaling"), [(10000.0, None), (500000.0, LLAMA3)])
def test_cos_sin_cache_matches_transformers(theta, scaling):
    config = hf_config(theta, scaling)
    spec = ModelSpec.from_hf_config(config.to_dict())
    assert (spec.rope_scaling is None) == (scaling is None)
    positions = 300  # past the original 64 positions, where the scaling matters
    ours = cos_sin_cache(spec, positions, torch.device("cpu"))
    assert ours.shape == (positions, spec.head_dim) and ours.dtype == torch.float32
    rotary = LlamaRotaryEmbedding(config)
    x = torch.zeros(1, positions, spec.head_dim)
    cos, sin = rotary(x, torch.arange(positions)[None])
    half = spec.head_dim // 2
    inv_freq = inverse_frequencies(spec.head_dim, spec.rope_theta, spec.rope_scaling).float()
    torch.testing.assert_close(inv_freq, rotary.inv_freq, rtol=1e-6, atol=0)
    # transformers repeats the head_dim/2 frequencies, the cache keeps each once; angles of a
    # few hundred radians in float32 differ in their last bits
    torch.testing.assert_close(ours[:, :half], cos[0, :, :half], atol=1e-4, rtol=0)
    torch.testing.assert_close(ours[:, half:], sin[0, :, :half], atol=1e-4, rtol=0)


def test_llama3_scaling_keeps_high_frequencies_and_divides_low_ones():
    """Wavelengths shorter than original / high_freq_factor are kept, longer than original /
    low_freq_factor divided by the factor, and those between blended monotonically."""
    spec = ModelSpec.from_hf_config(hf_config(500000.0, LLAMA3).to_dict())
    plain = inverse_frequencies(spec.head_dim, spec.rope_theta, None)
    scaled = inverse_frequencies(spec.head_dim, spec.rope_theta, spec.rope_scaling)
    wavelen = 2 * math.pi / plain
    high = wavelen < 64 / 4.0
    low = wavelen > 64 / 1.0
    assert high.any() and low.any()
    torch.testing.assert_close(scaled[high], plain[high])
    torch.testing.assert_close(scaled[low], plain[low] / 8.0)
    ratio = scaled / plain
    assert torch.all(ratio[1:] <= ratio[:-1])  # lower frequencies are scaled down more
    assert torch.all((ratio >= 1 / 8.0 - 1e-12) & (ratio <= 1.0 + 1e-12))


def test_position_zero_is_the_identity_rotation():
    spec = ModelSpec.from_hf_config(hf_config(10000.0, None).to_dict())
    first = cos_sin_cache(spec, 1, torch.device("cpu"))[0]
    half = spec.head_dim // 2
    assert torch.equal(first[:half], torch.ones(half))
    assert torch.equal(first[half:], torch.zeros(half))
