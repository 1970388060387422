"""Host slots for K/V blocks evicted from the GPU's prefix cache: sized from a memory budget,
shaped like one block of every layer, and copies that move exactly the blocks named, both ways."""

from __future__ import annotations

import pytest
import torch

from nanoflow.engine.block_manager import BlockCopy
from nanoflow.engine.host_kv_cache import HostKVCache

LAYERS, BLOCKS, BLOCK_SIZE, HEADS, HEAD_DIM = 3, 6, 4, 2, 8


def gpu_like_caches(dtype: torch.dtype = torch.float16) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per layer, K and V of ``BLOCKS`` blocks, every element naming its layer, block and side."""
    caches = []
    for layer in range(LAYERS):
        shape = (BLOCKS, BLOCK_SIZE, HEADS, HEAD_DIM)
        block = torch.arange(BLOCKS, dtype=dtype).view(-1, 1, 1, 1).expand(shape)
        caches.append(((block + 100 * layer).clone(), (block + 100 * layer + 50).clone()))
    return caches


def test_slots_are_one_block_of_every_layer_in_the_cache_dtype():
    caches = gpu_like_caches()
    host = HostKVCache(caches, num_slots=5)
    assert len(host.host) == LAYERS
    for (k, v), (host_k, host_v) in zip(caches, host.host, strict=True):
        assert host_k.shape == (5, *k.shape[1:]) and host_v.shape == (5, *v.shape[1:])
        assert host_k.dtype == k.dtype and not host_k.is_pinned()  # pinned only beside a GPU


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_slots_for_divides_the_budget_by_one_block_of_every_layer(dtype):
    caches = gpu_like_caches(dtype)
    per_slot = LAYERS * 2 * BLOCK_SIZE * HEADS * HEAD_DIM * dtype.itemsize
    gib = 10 * per_slot / (1 << 30)
    assert HostKVCache.slots_for(caches, gib) == 10
    assert HostKVCache.slots_for(caches, gib * 0.99) == 9  # whole slots only
    assert HostKVCache.slots_for(caches, 0.0) == 0


def test_copies_move_the_named_blocks_out_and_back():
    caches = gpu_like_caches()
    original = [(k.clone(), v.clone()) for k, v in caches]
    host = HostKVCache(caches, num_slots=4)
    host.run([BlockCopy(True, block=2, slot=0), BlockCopy(True, block=5, slot=3)])
    for (k, v), (host_k, host_v) in zip(original, host.host, strict=True):
        assert torch.equal(host_k[0], k[2]) and torch.equal(host_v[0], v[2])
        assert torch.equal(host_k[3], k[5]) and torch.equal(host_v[3], v[5])
    for k, v in caches:  # the GPU blocks are reused by other sequences
        k.zero_()
        v.zero_()
    host.run([BlockCopy(False, block=1, slot=3), BlockCopy(False, block=4, slot=0)])
    for (k, v), (k0, v0) in zip(caches, original, strict=True):
        assert torch.equal(k[1], k0[5]) and torch.equal(v[1], v0[5])
        assert torch.equal(k[4], k0[2]) and torch.equal(v[4], v0[2])
        untouched = [b for b in range(BLOCKS) if b not in (1, 4)]
        assert not k[untouched].any() and not v[untouched].any()


def test_copies_run_in_the_order_given():
    """A slot written and read back in one batch of copies gives the block written last."""
    caches = gpu_like_caches()
    original = [(k.clone(), v.clone()) for k, v in caches]
    host = HostKVCache(caches, num_slots=1)
    copies = [BlockCopy(True, 0, 0), BlockCopy(True, 3, 0), BlockCopy(False, 1, 0)]
    host.run(copies)
    for (k, v), (k0, v0) in zip(caches, original, strict=True):
        assert torch.equal(k[1], k0[3]) and torch.equal(v[1], v0[3])
