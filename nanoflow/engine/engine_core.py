"""The engine loop: plan an iteration, run it, sample, apply stop rules, report progress."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from nanoflow.config import EngineConfig
from nanoflow.distributed.parallel import ParallelGroup
from nanoflow.engine.block_manager import BlockManager
from nanoflow.engine.cuda_graphs import GraphStats
from nanoflow.engine.host_gc import quiet_garbage_collector
from nanoflow.engine.masked_sampling import DeferredFlight
from nanoflow.engine.model_runner import InFlight, ModelRunner
from nanoflow.engine.sampler import SamplerState
from nanoflow.engine.sampling_params import SamplingParams
from nanoflow.engine.schedule_select import select_schedule
from nanoflow.engine.scheduler import ScheduledChunk, Scheduler
from nanoflow.engine.sequence import PLACEHOLDER, PromptLogprob, Sequence
from nanoflow.errors import RequestError
from nanoflow.measure import iteration_bound_seconds
from nanoflow.models.loader import resolve_model
from nanoflow.models.spec import ModelSpec
from nanoflow.runtime.schedule import PipelineSchedule

logger = logging.getLogger(__name__)

Detokenize = Callable[[list[int]], str]
# Sees each sampled token before it is appended; raising fails that request alone, through the
# same path a real post-processing error takes (what fault injection tests use).
TokenHook = Callable[[Sequence, int], None]


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
    # per new token, its most likely alternatives as (token id, logprob), when logprobs > 0
    new_top_logprobs: list[list[tuple[int, float]]] = field(default_factory=list)
    # with the first token, when prompt_logprobs is set: per prompt position (None at the first)
    prompt_logprobs: list[PromptLogprob | None] | None = None


@dataclass
class StepStats:
    num_tokens: int = 0
    num_decode: int = 0
    num_prefill_tokens: int = 0
    kv_tokens: int = 0  # tokens of K/V the attention reads, its own new tokens included
    seconds: float = 0.0  # host time to plan and launch the iteration


@dataclass
class RunStats:
    """Totals over the engine's life: what a throughput figure is made of."""

    iterations: int = 0
    decode_only_iterations: int = 0
    tokens: int = 0
    decode_tokens: int = 0
    plan_seconds: float = 0.0  # host: scheduling decisions
    launch_seconds: float = 0.0  # host: inputs laid out and uploaded, kernels or graph queued
    prepare_seconds: float = 0.0  # host, part of launching: rows laid out, metadata uploaded
    wait_seconds: float = 0.0  # host: waiting for an iteration's sampled tokens
    resolve_seconds: float = 0.0  # host: applying them (stop rules, outputs)
    gpu_busy_seconds: float = 0.0  # GPU: from an iteration's first upload to its tokens' copy
    gpu_idle_seconds: float = 0.0  # GPU: between one iteration's end and the next's start
    shapes: list[tuple[int, int]] = field(default_factory=list)  # (tokens, kv_tokens) each

    def bound_seconds(
        self,
        spec: ModelSpec,
        gemm_flops_per_s: float,
        bytes_per_s: float,
        shards: int = 1,
        kv_dtype_bytes: int = 2,
    ) -> float:
        """The least time the iterations run could have taken (``iteration_bound_seconds``)."""
        return sum(
            iteration_bound_seconds(
                spec,
                tokens,
                kv,
                gemm_flops_per_s,
                bytes_per_s,
                shards,
                kv_dtype_bytes=kv_dtype_bytes,
            )  # fmt: skip
            for tokens, kv in self.shapes
        )

    def add(self, step: StepStats) -> None:
        self.iterations += 1
        self.decode_only_iterations += step.num_prefill_tokens == 0
        self.tokens += step.num_tokens
        self.decode_tokens += step.num_decode
        self.launch_seconds += step.seconds
        self.shapes.append((step.num_tokens, step.kv_tokens))

    def summary(self) -> dict[str, float]:
        n = max(1, self.iterations)
        return {
            "iterations": self.iterations,
            "tokens_per_iteration": self.tokens / n,
            "decodes_per_iteration": self.decode_tokens / n,
            "decode_only_fraction": self.decode_only_iterations / n,
            "host_plan_ms_per_iteration": 1e3 * self.plan_seconds / n,
            "host_launch_ms_per_iteration": 1e3 * self.launch_seconds / n,
            "host_prepare_ms_per_iteration": 1e3 * self.prepare_seconds / n,
            "host_wait_ms_per_iteration": 1e3 * self.wait_seconds / n,
            "host_resolve_ms_per_iteration": 1e3 * self.resolve_seconds / n,
            "gpu_busy_ms_per_iteration": 1e3 * self.gpu_busy_seconds / n,
            "gpu_idle_ms_per_iteration": 1e3 * self.gpu_idle_seconds / n,
        }


class EngineCore:
    """Requests in, tokens out: owns the scheduler, the block manager and rank 0's runner."""

    def __init__(
        self,
        config: EngineConfig,
        detokenize: Detokenize | None = None,
        on_token: TokenHook | None = None,
        runner_class: type[ModelRunner] = ModelRunner,
    ) -> None:
        """``runner_class``: a ModelRunner subclass to run the model with (e.g. one whose
        forward is stubbed out, to time the host's work alone)."""
        self.on_token = on_token
        self.launcher = None
        group = ParallelGroup()
        if config.tensor_parallel_size > 1:
            from nanoflow.engine.tensor_parallel import TensorParallelLauncher

            self.launcher = TensorParallelLauncher(config)
            config, group = self.launcher.config, self.launcher.group
        self.config = config
        self.detokenize = detokenize
        self.spec, checkpoint = resolve_model(config.model)
        device = config.torch_device()
        schedule, budget, source = select_schedule(config, self.spec, device)
        logger.info("pipeline schedule: %s", source)
        self.schedule_source = source
        self.runner = runner_class(config, self.spec, checkpoint, schedule, budget, group)
        self.runner.capture_startup_graphs(min(config.max_num_seqs, budget), budget)
        if self.launcher is not None:
            self.runner.on_plan = self.launcher.broadcast
            self.runner.on_schedule = self.launcher.broadcast_schedule
        self.blocks = BlockManager(
            self.runner.num_blocks,
            config.block_size,
            config.enable_prefix_caching,
            self.runner.host_kv.num_slots if self.runner.host_kv else 0,
        )
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
        self.stats = RunStats()
        self.async_scheduling = config.use_async_scheduling()
        self.in_flight: InFlight | DeferredFlight | None = None
        self.last_resolved: InFlight | None = None  # for the GPU's idle time between iterations
        quiet_garbage_collector()

    def reset_stats(self) -> None:
        """Count from here on only (a benchmark's measured run, after its warm-up)."""
        self.stats = RunStats()
        if self.runner.graphs is not None:
            self.runner.graphs.stats = GraphStats()

    def add_request(
        self, request_id: str, prompt_token_ids: list[int], params: SamplingParams
    ) -> Sequence:
        """Queue a request after checking it can ever be served; raises RequestError if not."""
        params.validate()
        params.check_token_ids(self.spec.vocab_size)
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
        if params.min_tokens:
            endings = set(params.stop_token_ids) | (
                set() if params.ignore_eos else self.eos_token_ids
            )
            seq.sampler_state = SamplerState(banned_until_min=tuple(sorted(endings)))
        self.scheduler.add(seq)
        return seq

    def abort_request(self, request_id: str) -> bool:
        return self.scheduler.abort(request_id) is not None

    @property
    def schedule(self) -> PipelineSchedule:
        return self.runner.schedule

    def shutdown(self) -> None:
        """Release the mask-filling thread and the tensor-parallel workers."""
        self.runner.mask_filler.shutdown()
        if self.launcher is not None:
            self.launcher.shutdown()
            self.launcher = None

    @property
    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished or self.in_flight is not None

    def step(self) -> list[RequestOutput]:
        """Launch one iteration and report the tokens of the last finished one.

        With async scheduling the iteration just launched is read back on the next call, so the
        host plans iteration i+1 while the GPU runs i; otherwise it is read back at once.
        """
        if isinstance(self.in_flight, DeferredFlight):
            self.in_flight.poll()  # its sampling queued as soon as its masks are filled
        planning = time.perf_counter()
        plan = self.scheduler.plan()
        self.stats.plan_seconds += time.perf_counter() - planning
        if plan.copies:
            self.runner.copy_blocks(plan.copies)
        launched = None
        outputs: list[RequestOutput] = []
        if plan:
            started = time.perf_counter()
            try:
                launched = self.runner.launch(plan, self.in_flight)
                self.stats.prepare_seconds += self.runner.last_prepare_seconds
            except Exception as exc:  # one bad batch must not take the engine down
                logger.exception("iteration failed; failing its %d requests", len(plan.chunks))
                outputs = [self._fail(c.seq, exc) for c in plan.chunks]
            else:
                self.scheduler.commit(plan)
                for chunk in launched.chunks:
                    self._append_placeholder(chunk.seq)
            self.last_step = StepStats(
                plan.num_tokens,
                len(plan.decodes),
                plan.num_prefill_tokens,
                sum(c.start + c.num_tokens for c in plan.chunks),
                time.perf_counter() - started,
            )
            self.stats.add(self.last_step)
        previous, self.in_flight = self.in_flight, launched
        if not self.async_scheduling and launched is not None:
            previous, self.in_flight = launched, None
        if previous is not None:
            waiting = time.perf_counter()
            try:
                tokens, logprobs = previous.results()
            except Exception as exc:  # its sampling failed late (a deferred, constrained step)
                logger.exception("sampling failed; failing its %d requests", len(previous.chunks))
                return outputs + [
                    self._fail(c.seq, exc) for c in previous.chunks if not c.seq.is_finished
                ]
            for seq, position, scored in previous.prompt_logprobs():
                seq.prompt_logprobs[position] = scored
            self._time_gpu(previous)
            resolving = time.perf_counter()
            outputs += self._resolve(previous.chunks, tokens, logprobs, previous.top_logprobs())
            self.stats.wait_seconds += resolving - waiting
            self.stats.resolve_seconds += time.perf_counter() - resolving
        return outputs

    def _append_placeholder(self, seq: Sequence) -> None:
        seq.output_token_ids.append(PLACEHOLDER)
        if (
            len(seq.output_token_ids) >= seq.params.max_tokens
            or seq.num_tokens >= self.max_model_len
        ):
            seq.finishing = True

    def _time_gpu(self, flight: InFlight) -> None:
        """Add a finished iteration's GPU span, and the gap since the one before, to the stats."""
        if flight.started is None or flight.copied is None:
            return
        self.stats.gpu_busy_seconds += flight.started.elapsed_time(flight.copied) / 1e3
        last = self.last_resolved
        if last is not None and last.copied is not None:
            self.stats.gpu_idle_seconds += max(0.0, last.copied.elapsed_time(flight.started)) / 1e3
        self.last_resolved = flight

    def _resolve(
        self,
        chunks: list[ScheduledChunk],
        tokens: list[int],
        logprobs: list[float] | None,
        top: list[list[tuple[int, float]]] | None = None,
    ) -> list[RequestOutput]:
        outputs = []
        now = time.perf_counter()  # one clock read for the iteration's tokens
        for i, chunk in enumerate(chunks):
            seq = chunk.seq
            if seq.is_finished:  # aborted or stopped while this token was in flight
                continue
            logprob = logprobs[i] if logprobs is not None else None
            first = seq.first_token_time is None
            try:
                if self.on_token is not None:
                    self.on_token(seq, tokens[i])
                out = self._append_token(seq, tokens[i], logprob, now)
                if top is not None and seq.params.logprobs:
                    out.new_top_logprobs = [top[i][: seq.params.logprobs]]
                if first:
                    out.prompt_logprobs = seq.prompt_logprobs
                outputs.append(out)
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

    def _append_token(
        self, seq: Sequence, token: int, logprob: float | None, now: float
    ) -> RequestOutput:
        resolved = seq.num_resolved_outputs
        seq.output_token_ids[resolved] = token
        if logprob is not None:
            seq.output_logprobs.append(logprob)
        if seq.first_token_time is None:
            seq.first_token_time = now
        reason = self._stop_reason(seq, token, resolved + 1)
        if reason is not None:
            del seq.output_token_ids[resolved + 1 :]  # drop tokens launched past the stop
            self.scheduler.finish(seq, reason)
        return self._output(seq, [token], [logprob] if logprob is not None else [])

    def _stop_reason(self, seq: Sequence, token: int, num_outputs: int) -> str | None:
        p = seq.params
        total = len(seq.prompt_token_ids) + num_outputs
        if num_outputs < p.min_tokens:
            return "length" if total >= self.max_model_len else None
        if not p.ignore_eos and token in self.eos_token_ids:
            return "stop"
        if token in p.stop_token_ids:
            return "stop"
        if p.stop and self.detokenize is not None:
            text = self.detokenize(seq.output_token_ids[:num_outputs])
            hits = [text.find(s) for s in p.stop if s in text]
            if hits:
                seq.stop_text_len = min(hits)
                return "stop"
        if num_outputs >= p.max_tokens or total >= self.max_model_len:
            return "length"
        return None

    def _output(self, seq: Sequence, tokens: list[int], logprobs: list[float]) -> RequestOutput:
        metrics = {
            "arrival_time": seq.arrival_time,
            "num_preemptions": seq.num_preemptions,
            "num_cached_tokens": seq.num_cached_tokens,
        }
        if seq.first_token_time is not None:
            metrics["first_token_time"] = seq.first_token_time
        if seq.finish_time is not None:
            metrics["finish_time"] = seq.finish_time
        return RequestOutput(
            request_id=seq.request_id,
            new_token_ids=tokens,
            new_logprobs=logprobs,
            num_prompt_tokens=len(seq.prompt_token_ids),
            num_output_tokens=seq.num_resolved_outputs,
            finished=seq.is_finished,
            finish_reason=seq.finish_reason,
            stop_text_len=seq.stop_text_len,
            metrics=metrics,
        )
