"""Tensor parallelism: a rank's place in its group and the collectives that join the shards
(Megatron-style column/row parallel layers, vocabulary-parallel embedding and LM head); how a
model's weights are cut is ``nanoflow.models.sharding``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F


@dataclass
class ParallelGroup:
    """This rank's place in its tensor-parallel group; size 1 means no parallelism."""

    rank: int = 0
    size: int = 1
    process_group: Any = None

    def part(self, t: torch.Tensor, dim: int) -> torch.Tensor:
        """This rank's contiguous shard of ``t`` along ``dim``."""
        return t.chunk(self.size, dim=dim)[self.rank].contiguous()

    def all_reduce(self, t: torch.Tensor) -> None:
        if self.size > 1:
            dist.all_reduce(t, group=self.process_group)

    def embed(self, ids: torch.Tensor, weight: torch.Tensor, out: torch.Tensor) -> None:
        if self.size == 1:
            torch.index_select(weight, 0, ids, out=out)
            return
        rows = weight.shape[0]
        local = ids - self.rank * rows
        inside = (local >= 0) & (local < rows)
        out.copy_(F.embedding(local.clamp(0, rows - 1), weight) * inside.unsqueeze(1))
        self.all_reduce(out)

    def lm_head(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        local = F.linear(x, weight)
        if self.size == 1:
            return local
        parts = [torch.empty_like(local) for _ in range(self.size)]
        dist.all_gather(parts, local, group=self.process_group)
        return torch.cat(parts, dim=-1)
