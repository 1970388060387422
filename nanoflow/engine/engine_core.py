"""The engine loop: plan an iteration, run it, sample, apply stop rules, report progress."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from nanoflow.config import EngineConfig
from nanoflow.distributed.parallel import ParallelGroup
from nanoflow.engine.block_manager import BlockManager
from nanoflow.engine.model_runner import ModelRunner
from nanoflow.engine.sampling_params import SamplingParams
from nanoflow.engine.scheduler import Scheduler
from nanoflow.engine.sequence import Sequence
from nanoflow.errors import RequestError
from nanoflow.models.loader import resolve_model
from nanoflow.pipeline.schedule_select import select_schedule

logger = logging.getLogger(__name__)

Detokenize = Callable[[list[int]], str]


@dataclass
class RequestOutput:
    """What one iteration produced for one request (new tokens, and the end if it ended)."""

    request_id: str
    new_token_ids: list[int]
    new_logprobs: list[float]
    num_prompt_tokens: int
    num_output_tokens: int
    finished: bool = False
    finish_reason: str | None = None
    stop_text_len: int | None = None
    error: str | None = None
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass
class StepStats:
    num_tokens: int = 0
    num_decode: int = 0
    num_prefill_tokens: int = 0
    seconds: float = 0.0


class EngineCore:
    def __init__(
        self,
        config: EngineConfig,
        detokenize: Detokenize | None = None,
        group: ParallelGroup | None = None,
    ) -> None:
        self.launcher = None
        if config.tensor_parallel_size > 1 and group is None:
            from nanoflow.distributed.launcher import TensorParallelLauncher

            self.launcher = TensorParallelLauncher(config)
            config, group = self.launcher.config, self.launcher.group
        self.config = config
        self.detokenize = detokenize
        self.spec, checkpoint = resolve_model(config.model)
        device = config.torch_device()
        self.schedule, budget, source = select_schedule(config, self.spec, device)
        logger.info("pipeline schedule: %s", source)
        self.schedule_source = source
        self.runner = ModelRunner(
            config, self.spec, checkpoint, self.schedule, budget, group or ParallelGroup()
        )
        if self.launcher is not None:
            self.runner.on_plan = self.launcher.broadcast
        self.blocks = BlockManager(self.runner.num_blocks, config.block_size)
        capacity = self.runner.num_blocks * config.block_size
        self.max_model_len = min(
            config.max_model_len or self.spec.max_position_embeddings,
            self.spec.max_position_embeddings,
            capacity,
        )
        self.scheduler = Scheduler(
            self.blocks, budget, config.max_num_seqs, config.expected_output_len
        )
        self.eos_token_ids = set(self.spec.eos_token_ids)
        self.last_step = StepStats()

    def add_request(
        self, request_id: str, prompt_token_ids: list[int], params: SamplingParams
    ) -> Sequence:
        """Queue a request after checking it can ever be served; raises RequestError if not."""
        params.validate()
        if not prompt_token_ids:
            raise RequestError("the prompt is empty")
        if any(not 0 <= t < self.spec.vocab_size for t in prompt_token_ids):
            raise RequestError(f"prompt token ids must be in [0, {self.spec.vocab_size})")
        total = len(prompt_token_ids) + params.max_tokens
        if total > self.max_model_len:
            raise RequestError(
                f"prompt ({len(prompt_token_ids)} tokens) + max_tokens ({params.max_tokens}) "
                f"exceeds the model's context of {self.max_model_len} tokens"
            )
        seq = Sequence(request_id, list(prompt_token_ids), params)
        self.scheduler.add(seq)
        return seq

    def abort_request(self, request_id: str) -> bool:
        return self.scheduler.abort(request_id) is not None

    def shutdown(self) -> None:
        """Release the tensor-parallel workers (no-op without tensor parallelism)."""
        if self.launcher is not None:
            self.launcher.shutdown()
            self.launcher = None

    @property
    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished

    def step(self) -> list[RequestOutput]:
        plan = self.scheduler.plan()
        if not plan:
            return []
        started = time.perf_counter()
        sampling = [c for c in plan.chunks if c.samples]
        try:
            result = self.runner.execute(plan)
        except Exception as exc:  # one bad batch must not take the engine down
            logger.exception("iteration failed; failing its %d requests", len(plan.chunks))
            return [self._fail(c.seq, exc) for c in plan.chunks]
        self.scheduler.commit(plan)
        self.last_step = StepStats(
            plan.num_tokens,
            len(plan.decodes),
            plan.num_prefill_tokens,
            time.perf_counter() - started,
        )
        outputs = []
        for i, chunk in enumerate(sampling):
            seq = chunk.seq
            logprob = result.logprobs[i] if result.logprobs else None
            try:
                outputs.append(self._append_token(seq, result.token_ids[i], logprob))
            except Exception as exc:
                logger.exception("post-processing %s failed", seq.request_id)
                outputs.append(self._fail(seq, exc))
        return outputs

    def _fail(self, seq: Sequence, exc: Exception) -> RequestOutput:
        if not seq.is_finished:
            self.scheduler.finish(seq, "error")
        out = self._output(seq, [], [])
        out.error = f"{type(exc).__name__}: {exc}"
        return out

    def _append_token(self, seq: Sequence, token: int, logprob: float | None) -> RequestOutput:
        now = time.perf_counter()
        seq.output_token_ids.append(token)
        if logprob is not None:
            seq.output_logprobs.append(logprob)
        if seq.first_token_time is None:
            seq.first_token_time = now
        reason = self._stop_reason(seq, token)
        if reason is not None:
            self.scheduler.finish(seq, reason)
        return self._output(seq, [token], [logprob] if logprob is not None else [])

    def _stop_reason(self, seq: Sequence, token: int) -> str | None:
        p = seq.params
        if not p.ignore_eos and token in self.eos_token_ids:
            return "stop"
        if token in p.stop_token_ids:
            return "stop"
        if p.stop and self.detokenize is not None:
            text = self.detokenize(seq.output_token_ids)
            hits = [text.find(s) for s in p.stop if s in text]
            if hits:
                seq.stop_text_len = min(hits)
                return "stop"
        if len(seq.output_token_ids) >= p.max_tokens or seq.num_tokens >= self.max_model_len:
            return "length"
        return None

    def _output(self, seq: Sequence, tokens: list[int], logprobs: list[float]) -> RequestOutput:
        metrics = {"arrival_time": seq.arrival_time, "num_preemptions": seq.num_preemptions}
        if seq.first_token_time is not None:
            metrics["first_token_time"] = seq.first_token_time
        if seq.finish_time is not None:
            metrics["finish_time"] = seq.finish_time
        return RequestOutput(
            request_id=seq.request_id,
            new_token_ids=tokens,
            new_logprobs=logprobs,
            num_prompt_tokens=len(seq.prompt_token_ids),
            num_output_tokens=len(seq.output_token_ids),
            finished=seq.is_finished,
            finish_reason=seq.finish_reason,
            stop_text_len=seq.stop_text_len,
            metrics=metrics,
        )
