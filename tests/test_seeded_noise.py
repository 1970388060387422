"""The seeded Exp(1) noise of the sampler's race: the kernel against its reference, the hash's
32-bit arithmetic against plain Python integers, and the draws' distribution."""

from __future__ import annotations

import math

import pytest
import torch

from nanoflow.engine.sampler import sampling_noise
from nanoflow.engine.sampling_params import SamplingParams
from nanoflow.engine.sequence import Sequence
from nanoflow.kernels.seeded_noise import (
    MASK32,
    mix32,
    noise_keys,
    seeded_exponential_ref,
    seeded_exponential_triton,
)

GPU = torch.cuda.is_available()


def _keys(pairs: list[tuple[int, int]], device: str = "cpu") -> torch.Tensor:
    return torch.tensor([noise_keys(s, d) for s, d in pairs], dtype=torch.int64, device=device)


def test_the_reference_hashes_with_exact_32_bit_arithmetic():
    """Element v of a row is mix32(mix32(v + first) ^ second), however large the keys."""
    pairs = [(0, 0), (7, 3), (2**40 + 9, 511), (-12, 1)]
    keys = _keys(pairs)
    draws = seeded_exponential_ref(keys, 70)
    for (first, second), row in zip(keys.tolist(), draws, strict=True):
        for v in (0, 1, 33, 69):
            h = mix32(mix32((v + first) & MASK32) ^ second)
            want = -math.log(((h >> 8) + 0.5) / (1 << 24))
            assert row[v].item() == pytest.approx(want, rel=1e-6)


def _check_kernel(device: str) -> None:
    pairs = [(seed, draw) for seed in (0, 1, 99, 2**33 + 5) for draw in (0, 1, 2, 1000)]
    for vocab in (1, 1000, 3001):
        keys = _keys(pairs, device)
        got, want = seeded_exponential_triton(keys, vocab), seeded_exponential_ref(keys, vocab)
        assert got.shape == (len(pairs), vocab) and got.dtype == torch.float32
        torch.testing.assert_close(got, want, rtol=2e-6, atol=0)


def test_the_kernel_matches_the_reference():
    _check_kernel("cpu")


@pytest.mark.gpu
@pytest.mark.skipif(not GPU, reason="needs a CUDA GPU")
def test_the_kernel_matches_the_reference_on_the_gpu():
    _check_kernel("cuda")


def test_the_kernel_refuses_keys_of_the_wrong_shape():
    with pytest.raises(ValueError, match=r"\[rows, 2\] int64"):
        seeded_exponential_triton(torch.zeros(3, dtype=torch.int64), 10)


def test_the_draws_are_exponential_and_uncorrelated():
    draws = seeded_exponential_ref(_keys([(5, d) for d in range(32)]), 20_000)
    assert draws.min() > 0
    assert draws.mean().item() == pytest.approx(1.0, abs=0.01)
    assert draws.var().item() == pytest.approx(1.0, abs=0.03)
    beside = torch.corrcoef(torch.stack([draws[:, :-1].flatten(), draws[:, 1:].flatten()]))
    after = torch.corrcoef(torch.stack([draws[:-1].flatten(), draws[1:].flatten()]))
    assert abs(beside[0, 1].item()) < 0.01 and abs(after[0, 1].item()) < 0.01
    uniform = torch.histc(torch.exp(-draws).flatten(), 10, 0, 1) / draws.numel()
    assert torch.allclose(uniform, torch.full((10,), 0.1), atol=0.003)


def test_keys_differ_by_seed_and_by_token_index():
    keys = {noise_keys(seed, draw) for seed in range(50) for draw in range(50)}
    assert len(keys) == 2500


def _seeded(seed: int, produced: int) -> Sequence:
    seq = Sequence("s", [0], SamplingParams(temperature=1.0, seed=seed))
    seq.output_token_ids = [1] * produced
    return seq


def test_a_seeded_row_draws_by_its_seed_and_token_index_alone():
    """The same draws whatever shares the batch, fresh draws for each next token."""
    vocab = 40
    alone = sampling_noise(torch.Size([1, vocab]), [_seeded(3, 4)], torch.device("cpu"))
    batch = [Sequence("r", [0], SamplingParams(temperature=1.0)), _seeded(9, 0), _seeded(3, 4)]
    mixed = sampling_noise(torch.Size([3, vocab]), batch, torch.device("cpu"))
    assert mixed.rows == [0, 1, 2]
    assert torch.equal(mixed.race[2], alone.race[0])
    assert torch.equal(mixed.race[1], seeded_exponential_ref(_keys([(9, 0)]), vocab)[0])
    later = sampling_noise(torch.Size([1, vocab]), [_seeded(3, 5)], torch.device("cpu"))
    assert not torch.equal(later.race[0], alone.race[0])


def test_batched_keys_equal_the_keys_of_each_row():
    from nanoflow.kernels.seeded_noise import noise_keys_batch

    seeds = [0, 7, -12, 2**40 + 9, 2**64 + 3, -(2**70), 123456789, 7]
    draws = [0, 3, 1, 511, 2**20, 9, 0, 4]
    keys = noise_keys_batch(seeds, draws)
    assert keys.dtype == torch.int64 and keys.shape == (len(seeds), 2)
    assert keys.tolist() == [list(noise_keys(s, d)) for s, d in zip(seeds, draws, strict=True)]
    assert noise_keys_batch([], []).shape == (0, 2)
