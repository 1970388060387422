"""Start a tensor-parallel group: rank 0 runs the engine, the other ranks mirror its iterations.

Two ways in: the engine spawns its own workers (``--tensor-parallel-size N`` on one host), or a
standard launcher (``torchrun``) starts every rank with ``RANK``/``WORLD_SIZE``/``MASTER_ADDR``/
``MASTER_PORT`` set, which also spans several nodes. Each iteration rank 0 broadcasts the plan
(just the tokens and block tables each rank needs) and every rank runs the same forward pass.
"""

from __future__ import annotations

import atexit
import dataclasses
import logging
import multiprocessing as mp
import os
import socket
from dataclasses import dataclass

import torch
import torch.distributed as dist

from nanoflow.config import EngineConfig
from nanoflow.distributed.parallel import ParallelGroup
from nanoflow.engine.scheduler import BatchPlan, ScheduledChunk
from nanoflow.runtime.schedule import PipelineSchedule

logger = logging.getLogger(__name__)

NCCL_NETWORK_CTAS = 16


@dataclass
class WireSequence:
    """What a worker needs of a sequence for one iteration (duck-types ``Sequence``)."""

    request_id: str
    block_table: list[int]
    start: int
    tokens: list[int]
    num_tokens: int
    scored_prompt_len: int  # the rows the lm_head computes must match rank 0's

    def token_slice(self, start: int, end: int) -> list[int]:
        return self.tokens[start - self.start : end - self.start]

    def token_at(self, position: int) -> int:
        return self.tokens[position - self.start]


def to_wire(plan: BatchPlan) -> BatchPlan:
    def chunk(c: ScheduledChunk) -> ScheduledChunk:
        end = c.start + c.num_tokens
        seq = WireSequence(
            c.seq.request_id,
            list(c.seq.block_table),
            c.start,
            c.seq.token_slice(c.start, end),
            c.seq.num_tokens,
            c.seq.scored_prompt_len,
        )
        return ScheduledChunk(seq, c.start, c.num_tokens)  # type: ignore[arg-type]

    return BatchPlan(
        decodes=[chunk(c) for c in plan.decodes], prefills=[chunk(c) for c in plan.prefills]
    )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_config(config: EngineConfig, rank: int) -> EngineConfig:
    if config.device == "auto" and torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", rank))
        return dataclasses.replace(config, device=f"cuda:{local}")
    return config


def init_group(rank: int, world: int, init_method: str, device: str) -> ParallelGroup:
    backend = "nccl" if device.startswith("cuda") else "gloo"
    if device.startswith("cuda"):
        os.environ.setdefault("NCCL_NVLS_ENABLE", "0")  # NVLink multicast stays off
        # Collectives are the network unit's work: keep them to a few SMs so GEMMs and
        # attention keep the rest (NanoFlow's network execution unit).
        os.environ.setdefault("NCCL_MAX_CTAS", str(NCCL_NETWORK_CTAS))
        torch.cuda.set_device(torch.device(device))
    dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=world)
    return ParallelGroup(rank, world, dist.group.WORLD)


def worker_main(config: EngineConfig, rank: int, world: int, init_method: str) -> None:
    """A non-zero rank: build this rank's shard and run every iteration rank 0 broadcasts."""
    from nanoflow.engine.host_gc import quiet_garbage_collector
    from nanoflow.engine.model_runner import ModelRunner
    from nanoflow.engine.schedule_select import select_schedule
    from nanoflow.models.loader import resolve_model

    quiet_garbage_collector()  # each iteration unpickles a plan of per-request objects
    config = _rank_config(config, rank)
    group = init_group(rank, world, init_method, str(config.torch_device()))
    spec, checkpoint = resolve_model(config.model)
    schedule, budget, _ = select_schedule(config, spec, config.torch_device())
    runner = ModelRunner(config, spec, checkpoint, schedule, budget, group)
    while True:
        message: list = [None]
        dist.broadcast_object_list(message, src=0)
        if message[0] is None:
            break
        if isinstance(message[0], PipelineSchedule):
            runner.set_schedule(message[0])
            continue
        with torch.inference_mode():
            runner.forward(runner.prepare(message[0]))
    dist.destroy_process_group()


class TensorParallelLauncher:
    """Rank 0's side: spawn (or join) the group and keep the workers in step."""

    def __init__(self, config: EngineConfig) -> None:
        self.world = config.tensor_parallel_size
        self.processes: list[mp.Process] = []
        atexit.register(self.shutdown)  # workers wait in a broadcast until told to stop
        if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
            rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
            self.config = _rank_config(config, rank)
            self.group = init_group(rank, world, "env://", str(self.config.torch_device()))
            return
        init_method = f"tcp://127.0.0.1:{_free_port()}"
        ctx = mp.get_context("spawn")
        for rank in range(1, self.world):
            proc = ctx.Process(
                target=worker_main, args=(config, rank, self.world, init_method), daemon=True
            )
            proc.start()
            self.processes.append(proc)
        self.config = _rank_config(config, 0)
        self.group = init_group(0, self.world, init_method, str(self.config.torch_device()))

    def broadcast(self, plan: BatchPlan | None) -> None:
        dist.broadcast_object_list([None if plan is None else to_wire(plan)], src=0)

    def broadcast_schedule(self, schedule: PipelineSchedule) -> None:
        """Every rank must issue the same collectives in the same order: switch them together."""
        dist.broadcast_object_list([schedule], src=0)

    def shutdown(self) -> None:
        if not dist.is_initialized():
            return
        self.broadcast(None)
        for proc in self.processes:
            proc.join(timeout=30)
        dist.destroy_process_group()


def run_worker_from_env(config: EngineConfig) -> bool:
    """Under torchrun, a rank other than 0 serves as a worker; returns True when it did."""
    rank = int(os.environ.get("RANK", "0"))
    if rank == 0 or "WORLD_SIZE" not in os.environ:
        return False
    worker_main(config, rank, int(os.environ["WORLD_SIZE"]), "env://")
    return True
