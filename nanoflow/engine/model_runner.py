"""Owns the model, its KV cache and step buffers; turns a BatchPlan into sampled tokens."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from nanoflow.config import EngineConfig
from nanoflow.distributed.parallel import ParallelGroup
from nanoflow.engine.batch import PreparedStep, prepare_step
from nanoflow.engine.block_manager import BlockCopy
from nanoflow.engine.cuda_graphs import PADDING_ROWS, StepGraphs
from nanoflow.engine.host_kv_cache import HostKVCache
from nanoflow.engine.masked_sampling import DeferredFlight, MaskFiller, constrained_rows
from nanoflow.engine.sampler import (
    DeviceSample,
    defer_grammar_tokens,
    sample,
    sampling_noise,
    score_prompt,
)
from nanoflow.engine.scheduler import BatchPlan, ScheduledChunk
from nanoflow.engine.sequence import PromptLogprob, Sequence
from nanoflow.engine.upload import to_device
from nanoflow.errors import ConfigError
from nanoflow.measure import time_cuda
from nanoflow.models.loader import build_model, load_weights
from nanoflow.models.offload import plan_offload
from nanoflow.models.quantization import Weight, effective_quantization
from nanoflow.models.spec import ModelSpec
from nanoflow.runtime.batch import StepBuffers
from nanoflow.runtime.executors import Executor, make_executor
from nanoflow.runtime.schedule import PipelineSchedule
from nanoflow.runtime.static_step import Capture, cuda_capture

logger = logging.getLogger(__name__)

_ACTIVATION_SLACK_BYTES = 2 << 30


def kv_block_bytes(spec: ModelSpec, block_size: int, dtype: torch.dtype, tp_size: int) -> int:
    per_token = spec.kv_bytes_per_token(torch.finfo(dtype).bits // 8) // tp_size
    return per_token * block_size


@dataclass
class InFlight:
    """An iteration queued on the GPU: its sampled tokens and their copy to pinned host memory."""

    chunks: list[ScheduledChunk]
    token_ids: torch.Tensor
    row_of: dict[str, int]
    host_tokens: torch.Tensor
    host_logprobs: torch.Tensor | None
    started: torch.cuda.Event | None  # recorded before the iteration's first upload
    copied: torch.cuda.Event | None
    host_top: tuple[torch.Tensor, torch.Tensor] | None = None  # top-k ids and logprobs
    scored: list[tuple[Sequence, int]] | None = None  # prompt tokens scored: sequence, position
    host_scores: list[torch.Tensor] | None = None  # their logprobs (and top-k ids, logprobs)
    token_list: list[int] | None = None  # host_tokens read, once the copy is done

    @staticmethod
    def timing_event(device: torch.device) -> torch.cuda.Event | None:
        """A timed event recorded on the current stream (None off the GPU)."""
        if device.type != "cuda":
            return None
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    @staticmethod
    def _to_host(tensor: torch.Tensor) -> torch.Tensor:
        on_gpu = tensor.is_cuda
        host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=on_gpu)
        return host.copy_(tensor, non_blocking=on_gpu)

    @classmethod
    def start(
        cls,
        chunks: list[ScheduledChunk],
        sampled: DeviceSample,
        started: torch.cuda.Event | None,
        scores: tuple[list[tuple[Sequence, int]], DeviceSample] | None = None,
    ) -> InFlight:
        """``scores``: the prompt tokens scored this iteration and their ``score_prompt``."""
        tokens = sampled.token_ids
        host = cls._to_host(tokens)
        host_logprobs = None if sampled.logprobs is None else cls._to_host(sampled.logprobs)
        host_top = None
        if sampled.top_ids is not None:
            host_top = (cls._to_host(sampled.top_ids), cls._to_host(sampled.top_logprobs))
        scored, host_scores = None, None
        if scores is not None:
            scored, prompt = scores
            found = (prompt.logprobs, prompt.top_ids, prompt.top_logprobs)
            host_scores = [cls._to_host(t) for t in found if t is not None]
        row_of = {c.seq.request_id: i for i, c in enumerate(chunks)}
        copied = cls.timing_event(tokens.device)
        return cls(
            chunks, tokens, row_of, host, host_logprobs, started, copied, host_top, scored,
            host_scores,
        )  # fmt: skip

    def results(self) -> tuple[list[int], list[float] | None]:
        """Wait for the copy (only this iteration, not later ones) and read the tokens."""
        tokens = self.tokens()
        logprobs = None if self.host_logprobs is None else self.host_logprobs.tolist()
        return tokens, logprobs

    def tokens(self) -> list[int]:
        """The sampled tokens, waiting for this iteration's copy only (read once, then kept)."""
        if self.token_list is None:
            if self.copied is not None:
                self.copied.synchronize()
            self.token_list = self.host_tokens.tolist()
        return self.token_list

    def top_logprobs(self) -> list[list[tuple[int, float]]] | None:
        """Per row, its top-k (token id, logprob) pairs; read after ``results``."""
        if self.host_top is None:
            return None
        ids, values = (t.tolist() for t in self.host_top)
        return [list(zip(i, v, strict=True)) for i, v in zip(ids, values, strict=True)]

    def prompt_logprobs(self) -> list[tuple[Sequence, int, PromptLogprob]]:
        """The prompt tokens scored by this iteration, each with its sequence, position and
        logprobs (its top-k cut to what the sequence asked); read after ``results``."""
        if self.scored is None:
            return []
        logprobs, *top = (t.tolist() for t in self.host_scores)
        out = []
        for i, (seq, position) in enumerate(self.scored):
            k = seq.params.prompt_logprobs
            alternatives = list(zip(top[0][i][:k], top[1][i][:k], strict=True)) if k else []
            out.append((seq, position, (logprobs[i], alternatives)))
        return out


class ModelRunner:
    """One rank's model, KV cache, step buffers and executor (and step graphs when enabled)."""

    def __init__(
        self,
        config: EngineConfig,
        spec: ModelSpec,
        checkpoint: Path | None,
        schedule: PipelineSchedule,
        max_num_batched_tokens: int,
        group: ParallelGroup,
    ) -> None:
        self.config = config
        self.spec = spec
        self.device = config.torch_device()
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        self.dtype = config.torch_dtype(self.device)
        self.kv_dtype = config.torch_kv_dtype(self.device)
        self.group = group
        self.on_plan: Callable[[BatchPlan], None] | None = None
        self.on_schedule: Callable[[PipelineSchedule], None] | None = None
        self.max_num_batched_tokens = max_num_batched_tokens
        self.quantization = effective_quantization(config.quantization, checkpoint)
        self.offload = plan_offload(config, spec, self.device, self.dtype, group, self.quantization)
        host_layers = self.offload.host_layers if self.offload else ()
        weights = load_weights(
            spec, checkpoint, config.load_format, self.device, self.dtype, config.seed,
            host_layers, self.quantization,
        )  # fmt: skip
        # rows past the token budget: room for the padding of CUDA-graph shapes
        self.buffers = StepBuffers.allocate(
            spec, max_num_batched_tokens + PADDING_ROWS, self.device, self.dtype, group.size,
            fp8_activations=self.quantization == "fp8",
        )  # fmt: skip
        self.num_blocks = self._num_kv_blocks(weights)
        # one block more than the block manager hands out: the scratch block CUDA-graph padding
        # rows write to
        self.model = build_model(
            spec, weights, self.num_blocks + 1, config.block_size, self.device, self.dtype, group,
            self.kv_dtype,
        )  # fmt: skip
        if self.offload is not None:
            self.offload.attach(self.model)
        self.host_kv: HostKVCache | None = None
        if config.kv_offload_gib:
            caches = [(layer.k_cache, layer.v_cache) for layer in self.model.layers]
            slots = HostKVCache.slots_for(caches, config.kv_offload_gib)
            if slots < 1:
                raise ConfigError(f"kv_offload_gib={config.kv_offload_gib} holds no KV block")
            self.host_kv = HostKVCache(caches, slots)
        self.last_prepare_seconds = 0.0  # host time the last launch spent in prepare()
        self.mask_filler = MaskFiller()
        self.set_schedule(schedule)

    def set_schedule(self, schedule: PipelineSchedule) -> None:
        if self.on_schedule is not None:
            self.on_schedule(schedule)
        self.schedule = schedule
        self.executor: Executor = make_executor(schedule, self.device)
        self.graphs: StepGraphs | None = None
        if self._use_cuda_graphs():
            self.graphs = self.step_graphs(cuda_capture(torch.cuda.graph_pool_handle()))

    def _use_cuda_graphs(self) -> bool:
        wanted = self.config.cuda_graphs
        if wanted and self.device.type != "cuda":
            raise ConfigError("cuda_graphs needs a CUDA device")
        if wanted is not None:
            return wanted
        single_gpu = self.group.size == 1
        return self.device.type == "cuda" and single_gpu and self.offload is None

    @torch.inference_mode()
    def capture_startup_graphs(self, max_decodes: int, budget: int) -> None:
        """With graphs on, capture the decode-only and full-budget shapes up front (logged with
        their time)."""
        if self.graphs is None:
            return
        started = time.perf_counter()
        count = self.graphs.capture_startup_shapes(max_decodes, budget)
        self.synchronize()
        logger.info("captured %d CUDA graphs in %.1f s", count, time.perf_counter() - started)

    def step_graphs(self, capture: Capture) -> StepGraphs:
        """Graphs of whole iterations of this runner's model, schedule and executor."""
        max_len = min(self.config.max_model_len or self.spec.max_position_embeddings,
                      self.spec.max_position_embeddings)  # fmt: skip
        width = min(self.num_blocks, -(-max_len // self.config.block_size))
        return StepGraphs(
            self.model, self.executor, self.buffers, self.schedule, self.config.block_size,
            width, self.num_blocks, capture,
        )  # fmt: skip

    def _num_kv_blocks(self, weights: dict[str, Weight]) -> int:
        if self.config.num_kv_blocks is not None:
            return self.config.num_kv_blocks
        block_bytes = kv_block_bytes(
            self.spec, self.config.block_size, self.kv_dtype, self.group.size
        )
        if self.device.type == "cuda":
            torch.cuda.empty_cache()  # what the allocator caches is free for the KV cache
            free, total = torch.cuda.mem_get_info(self.device)
            fused_copy = sum(w.nbytes for w in weights.values()) // max(1, self.spec.num_layers)
            budget = free - total * (1 - self.config.gpu_memory_utilization)
            budget -= _ACTIVATION_SLACK_BYTES + 2 * fused_copy
        else:
            budget = self.config.cpu_kv_cache_gib * (1 << 30)
        blocks = int(budget // block_bytes)
        if self.group.size > 1:  # every rank must hold the same block ids
            count = torch.tensor([blocks], device=self.device)
            torch.distributed.all_reduce(
                count, torch.distributed.ReduceOp.MIN, group=self.group.process_group
            )
            blocks = int(count.item())
        if blocks < 1:
            raise ConfigError(
                "no memory left for the KV cache after loading the weights; lower the model "
                "size, raise gpu_memory_utilization or use more tensor parallelism"
            )
        return blocks

    def prepare(self, plan: BatchPlan) -> PreparedStep:
        """The step in a graph's padded shape when graphs are on and one fits, else unpadded;
        a step that scores prompt tokens runs unpadded (a graph's layout names no scored rows)."""
        scores_prompt = any(c.start < c.seq.scored_prompt_len - 1 for c in plan.prefills)
        if self.graphs is not None and not scores_prompt:
            step = self.graphs.prepare(plan)
            if step is not None:
                return step
        return prepare_step(plan, self.schedule, self.buffers, self.config.block_size, self.device)

    def forward(self, step: PreparedStep) -> torch.Tensor:
        """Float32 logits of the sampling rows, then of the prompt rows scored."""
        if step.replay is not None:
            step.replay()
        else:
            self.model.embed(step.input_ids, self.buffers)
            self.executor.run(self.model.layer_ops, self.buffers, step.nano_batches)
        rows = step.sample_rows
        if step.prompt_rows:
            prompt_rows = [row for row, _, _ in step.prompt_rows]
            rows = torch.cat([rows, to_device(prompt_rows, torch.int64, self.device)])
        return self.model.logits(self.buffers, rows)

    @torch.inference_mode()
    def time_forward(self, plan: BatchPlan, iters: int = 10) -> float:
        """Median seconds of one forward pass of ``plan`` alone, outside the engine loop (GPU
        time from CUDA events on a GPU): what the tuner measures a candidate schedule by."""
        step = self.prepare(plan)
        if self.device.type == "cuda":
            return time_cuda(lambda: self.forward(step), iters=iters, warmup=3)
        times = []
        for _ in range(iters):
            started = time.perf_counter()
            self.forward(step)
            times.append(time.perf_counter() - started)
        return sorted(times)[len(times) // 2]

    @torch.inference_mode()
    def copy_blocks(self, copies: list[BlockCopy]) -> None:
        """Queue block copies between the KV cache and host memory, ahead of the next step."""
        if self.host_kv is None:
            raise RuntimeError("block copies without a host KV cache")
        self.host_kv.run(copies)

    def synchronize(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    @torch.inference_mode()
    def launch(
        self, plan: BatchPlan, previous: InFlight | DeferredFlight | None
    ) -> InFlight | DeferredFlight:
        """Queue an iteration on the GPU and return at once; its tokens arrive in the host
        buffer of the returned InFlight. Inputs still in flight from ``previous`` are read on
        the GPU. With grammar-constrained rows the sampling waits for their masks, filled on a
        host thread meanwhile (``masked_sampling``): a DeferredFlight stands for the InFlight
        until a poll finds the masks filled (at the next step's start and launch), the next
        launch after its prepare, or a read of its results queues it."""
        if self.on_plan is not None:
            self.on_plan(plan)
        if isinstance(previous, DeferredFlight):
            previous.poll()
        started = InFlight.timing_event(self.device)
        preparing = time.perf_counter()
        step = self.prepare(plan)
        self.last_prepare_seconds = time.perf_counter() - preparing
        if isinstance(previous, DeferredFlight):  # its sampling goes ahead of this forward
            previous = previous.done()
        if step.placeholder_rows:
            if previous is None:
                raise RuntimeError("a sequence waits on a token from no iteration in flight")
            rows = [r for r, _ in step.placeholder_rows]
            sources = [previous.row_of[rid] for _, rid in step.placeholder_rows]
            step.input_ids[to_device(rows, torch.int64, self.device)] = previous.token_ids[
                to_device(sources, torch.int64, self.device)
            ]
        logits = self.forward(step)
        n = len(step.sampling_chunks)
        seqs = [c.seq for c in step.sampling_chunks]
        grammars = constrained_rows(seqs)
        masks = None  # filling from now on, beside the host work below and the GPU's forward
        if grammars:
            masks = self.mask_filler.submit(grammars, n, logits.shape[1], logits.device)
        scores = None
        if step.prompt_rows:
            scored = [(seq, position) for _, seq, position in step.prompt_rows]
            scores = (scored, score_prompt(logits[n:], scored))
        noise = sampling_noise(logits[:n].shape, seqs, self.device)

        def finish(bitmask: torch.Tensor | None = None) -> InFlight:
            result = sample(logits[:n], seqs, bitmask, noise, in_place=True)
            flight = InFlight.start(step.sampling_chunks, result, started, scores)
            defer_grammar_tokens(seqs, flight.tokens)
            return flight

        if masks is None:
            return finish()
        return DeferredFlight(
            step.sampling_chunks, lambda: finish(masks.result().for_current_stream()), masks.done
        )
