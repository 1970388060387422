"""Rotary-embedding tables, including Llama 3's frequency scaling for long contexts."""

from __future__ import annotations

import math

import torch

from nanoflow.models.spec import ModelSpec, RopeScaling


def inverse_frequencies(head_dim: int, theta: float, scaling: RopeScaling | None) -> torch.Tensor:
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    if scaling is None:
        return inv_freq
    low_wavelen = scaling.original_max_position_embeddings / scaling.low_freq_factor
    high_wavelen = scaling.original_max_position_embeddings / scaling.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    smooth = (scaling.original_max_position_embeddings / wavelen - scaling.low_freq_factor) / (
        scaling.high_freq_factor - scaling.low_freq_factor
    )
    scaled = torch.where(wavelen > low_wavelen, inv_freq / scaling.factor, inv_freq)
    blended = (1 - smooth) * inv_freq / scaling.factor + smooth * inv_freq
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(medium, blended, scaled)


def cos_sin_cache(spec: ModelSpec, max_positions: int, device: torch.device) -> torch.Tensor:
    """``[max_positions, head_dim]`` float32: cosines of the head_dim/2 frequencies, then sines."""
    inv_freq = inverse_frequencies(spec.head_dim, spec.rope_theta, spec.rope_scaling).float()
    angles = torch.outer(torch.arange(max_positions, dtype=torch.float32), inv_freq)
    return torch.cat((angles.cos(), angles.sin()), dim=-1).to(device)
