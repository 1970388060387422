"""Run the search's best candidates for real and keep the fastest measured one: the cost model
ranks, the GPU decides.

Each candidate runs one steady-state iteration of its dense batch (the decodes and prompt tokens
``steady_batch`` predicts for the workload) through the engine's own runner with its schedule.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from tqdm import tqdm

from nanoflow.autotune.search import Candidate
from nanoflow.autotune.steady_state import SteadyBatch, WorkloadShape, steady_batch
from nanoflow.engine.engine_core import EngineCore
from nanoflow.engine.sampling_params import SamplingParams
from nanoflow.engine.scheduler import BatchPlan, ScheduledChunk
from nanoflow.engine.sequence import Sequence

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Measured:
    candidate: Candidate
    iteration_s: float

    @property
    def tokens_per_s(self) -> float:
        return self.candidate.dense_batch_size / self.iteration_s


def steady_plan(engine: EngineCore, batch: SteadyBatch) -> BatchPlan:
    """A plan of ``batch``'s shape over sequences placed straight in the cache. Block ids wrap
    around when the cache is smaller than the batch's context: the timing reads as many bytes,
    and the plan is never committed."""
    block_size = engine.config.block_size
    num_blocks = engine.runner.num_blocks
    context = max(1, round(batch.decode_context))
    prompt = max(1, round(batch.prompt_len))
    plan = BatchPlan()
    next_block = 0

    def place(seq: Sequence, length: int) -> None:
        nonlocal next_block
        count = -(-(length + 1) // block_size)
        seq.block_table = [(next_block + i) % num_blocks for i in range(count)]
        next_block += count

    for i in range(batch.decodes):
        seq = Sequence(f"tune-d{i}", [5] * context, SamplingParams(max_tokens=2))
        seq.output_token_ids = [7]
        seq.num_computed_tokens = context
        place(seq, context)
        plan.decodes.append(ScheduledChunk(seq, context, 1))
    left = batch.prefill_tokens
    while left > 0:
        take = min(prompt, left)
        seq = Sequence(f"tune-p{left}", [5] * prompt, SamplingParams(max_tokens=2))
        place(seq, prompt)
        plan.prefills.append(ScheduledChunk(seq, prompt - take, take))
        left -= take
    return plan


def validate(
    engine: EngineCore, candidates: list[Candidate], shape: WorkloadShape, iters: int = 10
) -> list[Measured]:
    """Each candidate measured on ``engine`` (whose buffers must hold the largest dense batch),
    fastest first; the engine is left on its original schedule."""
    original = engine.runner.schedule
    measured = []
    for candidate in tqdm(candidates, desc="validating", unit="candidate"):
        engine.runner.set_schedule(candidate.schedule)
        plan = steady_plan(engine, steady_batch(candidate.dense_batch_size, shape))
        seconds = engine.runner.time_forward(plan, iters)
        logger.info(
            "dense batch %d: predicted %.2f ms, measured %.2f ms",
            candidate.dense_batch_size,
            candidate.predicted_iteration_s * 1e3,
            seconds * 1e3,
        )
        measured.append(Measured(candidate, seconds))
    engine.runner.set_schedule(original)
    return sorted(measured, key=lambda m: m.tokens_per_s, reverse=True)
