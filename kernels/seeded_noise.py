"""Seeded Exp(1) noise for the sampler's exponential race, every seeded row in one launch.

A seeded request must sample the same text whatever else shares its batch, so its draws cannot
come from the device's generator. One ``torch.Generator`` per request costs a launch per row
per step (hundreds of launches a step at a large batch). Here the draws are a counter-based
hash instead: element ``v`` of a row is a function of the row's two 32-bit keys (mixed on the
host from the request's seed and the index of the token being sampled) and ``v`` alone, so
every row of every step is one kernel, and the draws depend on nothing but the request.

The hash is Wellons' ``lowbias32`` integer finalizer, applied twice. Its top 24 bits give a
uniform u in (0, 1) and the draw is ``-log(u)``. The reference does the same arithmetic in
int64 masked to 32 bits, so the kernel and the reference agree up to the rounding of ``log``.
"""

from __future__ import annotations

import functools
from typing import TypeVar

import numpy as np
import torch

from nanoflow.kernels._compat import cdiv, jit, tl

MASK32 = 0xFFFFFFFF
_MUL_1, _MUL_2 = 0x21F0AAAD, 0x735A2D97  # lowbias32's multipliers
_SEED_SALT, _DRAW_SALT, _KEY_SALT = 0x9E3779B9, 0x85EBCA6B, 0xC2B2AE35
_BLOCK = 1024
IntLike = TypeVar("IntLike", int, torch.Tensor, np.ndarray)


def _mul32(x: IntLike, constant: int) -> IntLike:
    """``x * constant`` mod 2**32 for ``x`` below 2**32, without overflowing int64."""
    low = x * (constant & 0xFFFF)
    high = ((x * (constant >> 16)) & 0xFFFF) << 16
    return (low + high) & MASK32


def mix32(x: IntLike) -> IntLike:
    """lowbias32 of the low 32 bits of ``x``: a Python int or an int64 array (the host's keys)
    or an int64 tensor (the reference's draws)."""
    x = x & MASK32
    x = x ^ (x >> 16)
    x = _mul32(x, _MUL_1)
    x = x ^ (x >> 15)
    x = _mul32(x, _MUL_2)
    return x ^ (x >> 15)


@functools.lru_cache(maxsize=1 << 16)
def _seed_base(seed: int) -> int:
    """The part of a request's keys that depends on its seed only (any Python int)."""
    return mix32(seed ^ mix32((seed >> 32) ^ _SEED_SALT))


def noise_keys(seed: int, draw: int) -> tuple[int, int]:
    """The two 32-bit keys of a request's ``draw``-th sampled token (its index in the output)."""
    first = mix32(_seed_base(seed) ^ mix32(draw ^ _DRAW_SALT))
    return first, mix32(first ^ _KEY_SALT)


def noise_keys_batch(seeds: list[int], draws: list[int]) -> torch.Tensor:
    """``[rows, 2]`` int64: :func:`noise_keys` of each (seed, draw) pair, the per-draw mixing
    done for all rows at once. A step keys every seeded row, and one Python call of a dozen
    integer ops a row costs milliseconds at a batch of hundreds, on the host's critical path
    when sampling waits for grammar masks."""
    base = np.array([_seed_base(seed) for seed in seeds], dtype=np.int64)
    first = mix32(base ^ mix32(np.array(draws, dtype=np.int64) ^ _DRAW_SALT))
    return torch.from_numpy(np.stack([first, mix32(first ^ _KEY_SALT)], axis=1))


def seeded_exponential_ref(keys: torch.Tensor, vocab: int) -> torch.Tensor:
    """``[rows, vocab]`` float32 Exp(1) draws, row ``r`` from ``keys[r]`` ([rows, 2] int64,
    each below 2**32, from :func:`noise_keys`)."""
    cols = torch.arange(vocab, dtype=torch.int64, device=keys.device)
    first, second = keys[:, :1], keys[:, 1:]
    h = mix32(mix32(cols + first) ^ second)
    u = ((h >> 8).to(torch.float32) + 0.5) * (1.0 / (1 << 24))
    return -torch.log(u)


@jit
def _mix32_device(x):
    x = x ^ (x >> 16)
    x = x * 0x21F0AAAD  # uint32 arithmetic wraps mod 2**32; lowbias32's multipliers
    x = x ^ (x >> 15)
    x = x * 0x735A2D97
    return x ^ (x >> 15)


@jit
def _seeded_exponential_kernel(keys_ptr, out_ptr, vocab, stride_o, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    first = tl.load(keys_ptr + row * 2).to(tl.uint32)
    second = tl.load(keys_ptr + row * 2 + 1).to(tl.uint32)
    h = _mix32_device(_mix32_device(cols.to(tl.uint32) + first) ^ second)
    u = ((h >> 8).to(tl.float32) + 0.5) * (1.0 / 16777216.0)
    tl.store(out_ptr + row * stride_o + cols, -tl.log(u), mask=cols < vocab)


def seeded_exponential_triton(keys: torch.Tensor, vocab: int) -> torch.Tensor:
    """As :func:`seeded_exponential_ref`, in one launch for all rows."""
    if keys.dim() != 2 or keys.shape[1] != 2 or keys.dtype != torch.int64:
        raise ValueError(f"keys must be [rows, 2] int64, got {tuple(keys.shape)} {keys.dtype}")
    keys = keys.contiguous()
    out = torch.empty(keys.shape[0], vocab, dtype=torch.float32, device=keys.device)
    if keys.shape[0] and vocab:
        grid = (keys.shape[0], cdiv(vocab, _BLOCK))
        _seeded_exponential_kernel[grid](keys, out, vocab, out.stride(0), BLOCK=_BLOCK)
    return out
