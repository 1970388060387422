"""Data-parallel replicas behind one front end (DeepSpeed-FastGen's replica load balancing).

Each replica is its own engine process (one GPU, or one tensor-parallel group of GPUs). A request
goes to the replica with the fewest outstanding tokens: prompt plus the tokens it may still
generate, summed over the replica's unfinished requests.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from typing import Any

import torch

from nanoflow.config import EngineConfig
from nanoflow.engine.sampling_params import SamplingParams
from nanoflow.errors import ConfigError
from nanoflow.server.engine_client import EngineClient, EngineInfo, RequestStream

logger = logging.getLogger(__name__)


def replica_config(config: EngineConfig, index: int) -> EngineConfig:
    """Replica ``index`` takes GPUs ``index * tp ... (index + 1) * tp - 1``."""
    if config.torch_device().type != "cuda":
        return config
    first = index * config.tensor_parallel_size
    if first + config.tensor_parallel_size > torch.cuda.device_count():
        raise ValueError(
            f"{index + 1} replicas of {config.tensor_parallel_size} GPUs need more GPUs than "
            f"the {torch.cuda.device_count()} visible"
        )
    return dataclasses.replace(config, device=f"cuda:{first}")


class ReplicaPool:
    """Looks like one ``EngineClient`` to the HTTP layer; spreads requests over replicas."""

    def __init__(
        self, config: EngineConfig, size: int, log_level: int = logging.WARNING, restarts: int = 0
    ):
        if size < 1:
            raise ConfigError(f"data_parallel_size must be at least 1, got {size}")
        self.replicas = [
            EngineClient(replica_config(config, i), log_level, restarts) for i in range(size)
        ]
        self.iteration_listeners: list[Any] = []
        self._assigned: list[list[tuple[RequestStream, int]]] = [[] for _ in range(size)]
        self.requests_per_replica = [0] * size

    @property
    def info(self) -> EngineInfo | None:
        infos = [r.info for r in self.replicas]
        if any(i is None for i in infos):
            return None
        return min(infos, key=lambda i: i.max_model_len)  # every replica must accept a request

    @property
    def dead(self) -> bool:
        return any(r.dead for r in self.replicas)

    @property
    def dead_reason(self) -> str | None:
        return next((r.dead_reason for r in self.replicas if r.dead), None)

    @property
    def on_fatal(self) -> Any:
        return self.replicas[0].on_fatal

    @on_fatal.setter
    def on_fatal(self, callback: Any) -> None:
        for replica in self.replicas:
            replica.on_fatal = callback

    @property
    def num_in_flight(self) -> int:
        return sum(r.num_in_flight for r in self.replicas)

    def health(self) -> str | None:
        problems = [f"replica {i}: {h}" for i, r in enumerate(self.replicas) if (h := r.health())]
        return "; ".join(problems) or None

    async def start(self) -> EngineInfo:
        for replica in self.replicas:
            replica.iteration_listeners = self.iteration_listeners
        await asyncio.gather(*(r.start() for r in self.replicas))
        return self.info

    def outstanding_tokens(self, index: int) -> int:
        live = [(s, cost) for s, cost in self._assigned[index] if s.unfinished]
        self._assigned[index] = live
        return sum(cost for _, cost in live)

    def submit(self, requests: list[tuple[list[int], SamplingParams]]) -> RequestStream:
        cost = sum(len(tokens) + params.max_tokens for tokens, params in requests)
        loads = [self.outstanding_tokens(i) for i in range(len(self.replicas))]
        index = min(range(len(self.replicas)), key=lambda i: (loads[i], i))
        stream = self.replicas[index].submit(requests)
        self._assigned[index].append((stream, cost))
        self.requests_per_replica[index] += len(requests)
        return stream

    def abort_all(self) -> None:
        for replica in self.replicas:
            replica.abort_all()

    async def stats(self, timeout: float = 5.0) -> dict[str, Any]:
        parts = await asyncio.gather(*(r.stats(timeout) for r in self.replicas))
        merged: dict[str, Any] = {
            key: sum(p[key] for p in parts)
            for key in ("running", "waiting", "free_blocks", "num_blocks", "prefix_cached_tokens")
        }
        merged["kv_usage"] = 1.0 - merged["free_blocks"] / merged["num_blocks"]
        merged["iteration_seconds"] = max(p["iteration_seconds"] for p in parts)
        merged["replicas"] = [
            {**p, "requests": n, "outstanding_tokens": self.outstanding_tokens(i)}
            for i, (p, n) in enumerate(zip(parts, self.requests_per_replica, strict=True))
        ]
        return merged

    async def shutdown(self) -> None:
        await asyncio.gather(*(r.shutdown() for r in self.replicas))
