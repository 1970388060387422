"""Host memory for K/V blocks evicted from the GPU's prefix cache (KV offload for multi-round
conversations: the next round of a conversation finds its history here instead of recomputing
it). Pinned on a GPU, so the copies are queued on the stream and the host never waits for them.
"""

from __future__ import annotations

import torch

from nanoflow.engine.block_manager import BlockCopy


class HostKVCache:
    """``num_slots`` slots, each holding one block of every layer's K and V."""

    def __init__(self, caches: list[tuple[torch.Tensor, torch.Tensor]], num_slots: int) -> None:
        self.caches = caches
        self.num_slots = num_slots
        pin = caches[0][0].is_cuda

        def slots_like(cache: torch.Tensor) -> torch.Tensor:
            shape = (num_slots, *cache.shape[1:])
            return torch.empty(shape, dtype=cache.dtype, pin_memory=pin)

        self.host = [(slots_like(k), slots_like(v)) for k, v in caches]

    @staticmethod
    def slots_for(caches: list[tuple[torch.Tensor, torch.Tensor]], gib: float) -> int:
        """How many slots ``gib`` GiB of host memory hold."""
        per_slot = sum(k[0].nbytes + v[0].nbytes for k, v in caches)
        return int(gib * (1 << 30)) // per_slot

    def run(self, copies: list[BlockCopy]) -> None:
        """Queue the copies in order on the current stream."""
        for copy in copies:
            for (k, v), (host_k, host_v) in zip(self.caches, self.host, strict=True):
                if copy.to_host:
                    host_k[copy.slot].copy_(k[copy.block], non_blocking=True)
                    host_v[copy.slot].copy_(v[copy.block], non_blocking=True)
                else:
                    k[copy.block].copy_(host_k[copy.slot], non_blocking=True)
                    v[copy.block].copy_(host_v[copy.slot], non_blocking=True)
