"""Measure the op tables on the GPU: the real ops of one decoder layer (dummy weights, synthetic
nano-batches) timed under each SM budget the way the executor runs them (the unit's stream and
cuBLASLt carve-out active, the budget passed to the kernels), plus, per mechanism, one co-running
pair of ops for each pair of resource classes a schedule can put on two units (the interference
factors) and the host cost of one launch.

A couple of minutes for an 8B model: a coarse grid, few repetitions, one layer.
"""

from __future__ import annotations

import dataclasses
import datetime
import logging
import time
from collections.abc import Callable

import torch
from tqdm import tqdm

from nanoflow.autotune.tables import SHARED_SMS, OpTable, OpTables
from nanoflow.distributed.parallel import ParallelGroup
from nanoflow.measure import time_cuda
from nanoflow.models.loader import build_model
from nanoflow.models.quantization import quantize_linears
from nanoflow.models.spec import ModelSpec
from nanoflow.models.weights import dummy_weights
from nanoflow.runtime.batch import AttentionChunks, NanoBatch, StepBuffers
from nanoflow.runtime.executors import OverlappedExecutor
from nanoflow.runtime.graph import DECODE_ATTENTION, PREFILL_ATTENTION, OpSpec, Resource, Rows
from nanoflow.runtime.ops import Op
from nanoflow.runtime.schedule import (
    Mechanism,
    PipelineSchedule,
    UnitSpec,
    default_overlapped_schedule,
    shared_sm_schedule,
)
from nanoflow.runtime.units import ExecutionUnit, build_units, device_sm_count

logger = logging.getLogger(__name__)

TOKENS = (64, 128, 256, 512, 1024, 2048, 4096)
DECODES = (16, 64, 256, 512)
PREFILL_TOKENS = (128, 512, 1024, 2048)
CONTEXTS = (256, 512, 1024, 2048)
SM_FRACTIONS = (1 / 8, 1 / 4, 3 / 8, 1 / 2, 5 / 8, 3 / 4, 7 / 8)
GRID_TOKENS = {Rows.ALL: TOKENS, Rows.DECODE: DECODES, Rows.PREFILL: PREFILL_TOKENS}
BLOCK_SIZE = 16
LM_HEAD = OpSpec("lm_head", Resource.COMPUTE)
PAIR_SPLITS = {Mechanism.CTA_LIMIT: 32, Mechanism.GREEN_CONTEXT: 32}  # memory unit's SMs
# (op names, tokens, context) timed on the first unit and beside it on the second, per class
# pair: the MLP's GEMMs (a dense layer's gate-up, a MoE layer's experts) beside decode attention,
# the small memory-bound ops beside it (two readers of one memory system), and the GEMMs beside
# prefill attention placed on the memory unit; the first name the layer has is taken
MLP_GEMMS = ("gate_up_proj", "experts")
PAIR_OPS = {
    "compute+memory": ((MLP_GEMMS, 2048, 0), ((DECODE_ATTENTION,), 256, 1024)),
    "memory+memory": ((("silu_mul", "post_attn_norm"), 2048, 0), ((DECODE_ATTENTION,), 256, 1024)),
    "compute+compute": ((MLP_GEMMS, 2048, 0), ((PREFILL_ATTENTION,), 1024, 1024)),
}


class LayerBench:
    """One layer of the model with buffers and a KV cache big enough for the largest grid point."""

    def __init__(
        self,
        spec: ModelSpec,
        device: torch.device,
        dtype: torch.dtype,
        kv_dtype: torch.dtype | None = None,
        quantization: str | None = None,
    ) -> None:
        self.device = device
        self.spec = dataclasses.replace(spec, num_layers=1)
        weights = dummy_weights(self.spec, device, dtype, seed=0)
        if quantization == "fp8":
            weights = quantize_linears(weights)
        self.num_blocks = max(DECODES) * max(CONTEXTS) // BLOCK_SIZE
        self.model = build_model(
            self.spec,
            weights,
            self.num_blocks,
            BLOCK_SIZE,
            device,
            dtype,
            ParallelGroup(),
            kv_dtype,
        )
        self.ops: list[Op] = self.model.layer_ops[0]
        rows = max(TOKENS + DECODES + PREFILL_TOKENS)
        fp8 = quantization == "fp8"
        self.buffers = StepBuffers.allocate(self.spec, rows, device, dtype, fp8_activations=fp8)
        for name in ("hidden", "residual", "normed", "qkv", "attn", "gate_up", "act"):
            getattr(self.buffers, name).normal_(0.0, 0.5)
        self.buffers.positions.copy_(torch.arange(rows) % 1024)
        self.buffers.slot_mapping.copy_(torch.arange(rows) % (self.num_blocks * BLOCK_SIZE))
        routing = getattr(self.model, "routing", None)
        if routing is not None:  # a MoE layer's experts read what its router wrote: fill it once
            routing.fit(rows)
            scores = torch.rand(rows, self.spec.num_experts, device=device)
            top, ids = torch.topk(scores, routing.top_k, dim=-1)
            routing.weights.copy_(top / top.sum(-1, keepdim=True))
            routing.ids.copy_(ids)

    def _chunks(self, q_lens: list[int], context: int) -> AttentionChunks:
        blocks = -(-context // BLOCK_SIZE)
        tables = torch.randint(0, self.num_blocks, (len(q_lens), blocks), dtype=torch.int32)
        cu = [0, *torch.tensor(q_lens).cumsum(0).tolist()]

        def on(values) -> torch.Tensor:
            return torch.as_tensor(values, dtype=torch.int32).to(self.device)

        return AttentionChunks(on(tables), on([context] * len(q_lens)), on(cu), max(q_lens))

    def nano_batch(self, rows: Rows, tokens: int, context: int = 0) -> NanoBatch:
        if rows is Rows.DECODE:
            decode = self._chunks([1] * tokens, context)
            return NanoBatch(0, 0, tokens, tokens, decode, None, ())
        if rows is Rows.PREFILL:
            per = min(tokens, context)
            q_lens = [per] * (tokens // per) + ([tokens % per] if tokens % per else [])
            return NanoBatch(0, 0, tokens, 0, None, self._chunks(q_lens, context), ())
        return NanoBatch(0, 0, tokens, 0, None, None, ())

    def lm_head(self, rows: int) -> Callable[[int | None], None]:
        from nanoflow import kernels

        x = self.buffers.normed[:rows]
        return lambda sms: kernels.linear(x, self.model.lm_head, None, sms)


def _unit(device: torch.device, sms: int | None) -> ExecutionUnit:
    """A CTA-limited unit: op tables are measured that way; green contexts differ only in the
    interference factor."""
    schedule = PipelineSchedule(
        units=(UnitSpec("main", sms),),
        op_units={"compute": "main", "memory": "main", "network": "main"},
    )
    return build_units(schedule, device)["main"]


def _time_on(unit: ExecutionUnit, fn: Callable[[int | None], None]) -> float:
    with unit.active():
        # GPU time alone: the engine replays iterations from CUDA graphs, with no launch gaps
        return time_cuda(lambda: fn(unit.num_sms), iters=5, warmup=2, queue_ahead=True)


def _sm_grid(total: int) -> tuple[int, ...]:
    return tuple(sorted({max(8, round(total * f / 8) * 8) for f in SM_FRACTIONS} | {total}))


def _op_table(bench: LayerBench, op: Op, units: dict[int, ExecutionUnit], bar: tqdm) -> OpTable:
    rows = op.spec.rows
    tokens = GRID_TOKENS[rows]
    contexts = CONTEXTS if rows is not Rows.ALL else (0,)
    seconds = []
    for t in tokens:
        plane = []
        for c in contexts:
            nb = bench.nano_batch(rows, t, c)
            line = []
            for unit in units.values():
                line.append(_time_on(unit, lambda sms, nb=nb: op.fn(bench.buffers, nb, sms)))
                bar.update()
            plane.append(tuple(line))
        seconds.append(tuple(plane))
    return OpTable(op.spec, tokens, contexts, tuple(units), tuple(seconds))


def _interference(bench: LayerBench, mechanism: Mechanism, total: int) -> dict[str, float]:
    """Each class pair's slowdown on two disjoint partitions of the SMs."""
    memory_sms = PAIR_SPLITS[mechanism]
    schedule = PipelineSchedule(
        units=(UnitSpec("compute", total - memory_sms), UnitSpec("memory", memory_sms)),
        op_units={"compute": "compute", "memory": "memory", "network": "compute"},
        mechanism=mechanism,
        overlap=True,
    )
    units = build_units(schedule, bench.device)
    return _pair_factors(bench, units["compute"], units["memory"])


def _shared_interference(bench: LayerBench, total: int) -> dict[str, float]:
    """Each class pair's slowdown when the first op keeps the whole GPU and the second runs
    beside it, CTA-limited on a high-priority stream (the hand-written overlapped layout)."""
    units = build_units(shared_sm_schedule(total), bench.device)
    return _pair_factors(bench, units["compute"], units["attention"])


def pair_ops(op_names: list[str]) -> dict[str, tuple[tuple[str, int, int], ...]]:
    """Each class pair of ``PAIR_OPS`` as the ops of this layer that stand for it, (name,
    tokens, context) per side; a pair whose side the layer lacks is left out (no slowdown)."""
    pairs = {}
    for pair, sides in PAIR_OPS.items():
        chosen = []
        for names, tokens, context in sides:
            name = next((n for n in names if n in op_names), None)
            if name is not None:
                chosen.append((name, tokens, context))
        if len(chosen) == len(sides):
            pairs[pair] = tuple(chosen)
    return pairs


def _pair_factors(
    bench: LayerBench, first: ExecutionUnit, second: ExecutionUnit
) -> dict[str, float]:
    """The slowdown of every class pair the layer's ops stand for (``pair_ops``)."""
    by_name = {op.name: op for op in bench.ops}
    return {
        pair: _pair_slowdown(bench, (first, by_name[a], *a_size), (second, by_name[b], *b_size))
        for pair, ((a, *a_size), (b, *b_size)) in pair_ops(list(by_name)).items()
    }


PairSide = tuple[ExecutionUnit, Op, int, int]  # the unit, the op, its tokens and context


def _pair_slowdown(bench: LayerBench, *sides: PairSide) -> float:
    """Slowdown of two ops on their units while they overlap: with both slowed by f while the
    shorter runs, together = f * shorter + (longer - shorter)."""
    runs = []
    for unit, op, tokens, context in sides:
        nb = bench.nano_batch(op.spec.rows, tokens, context)
        runs.append((unit, lambda sms, op=op, nb=nb: op.fn(bench.buffers, nb, sms)))

    def both() -> None:
        main = torch.cuda.current_stream()
        for unit, fn in runs:
            unit.stream.wait_stream(main)
            with unit.active():
                fn(unit.num_sms)
        for unit, _ in runs:
            main.wait_stream(unit.stream)

    a, b = (_time_on(unit, fn) for unit, fn in runs)
    together = time_cuda(both, iters=10, warmup=3, queue_ahead=True)
    shorter, longer = min(a, b), max(a, b)
    return max(1.0, (together - longer + shorter) / shorter)


def _launch_seconds(bench: LayerBench) -> float:
    """Host seconds per op launch through the overlapped executor (events included)."""
    schedule = default_overlapped_schedule(device_sm_count(bench.device))
    executor = OverlappedExecutor(schedule, bench.device)
    nbs = [bench.nano_batch(Rows.DECODE, 64, 256) for _ in range(2)]
    layers = [bench.ops] * 4
    executor.run(layers, bench.buffers, nbs)
    torch.cuda.synchronize(bench.device)
    started = time.perf_counter()
    for _ in range(5):
        executor.run(layers, bench.buffers, nbs)
    elapsed = time.perf_counter() - started
    torch.cuda.synchronize(bench.device)
    return elapsed / (5 * len(layers) * len(bench.ops) * len(nbs))


@torch.inference_mode()
def profile_op_tables(
    spec: ModelSpec,
    model: str,
    device: torch.device,
    dtype: torch.dtype = torch.bfloat16,
    kv_dtype: torch.dtype | None = None,
    quantization: str | None = None,
) -> OpTables:
    """Measure everything the cost model needs on ``device`` (a CUDA GPU), attention over a KV
    cache of ``kv_dtype`` (default: the model's), GEMMs over ``quantization``'s weights."""
    total = device_sm_count(device)
    bench = LayerBench(spec, device, dtype, kv_dtype, quantization)
    units = {s: _unit(device, None if s == total else s) for s in _sm_grid(total)}
    points = sum(
        len(GRID_TOKENS[op.spec.rows]) * (1 if op.spec.rows is Rows.ALL else len(CONTEXTS))
        for op in bench.ops
    )
    with tqdm(total=points * len(units), desc="profiling ops", unit="timing") as bar:
        tables = tuple(_op_table(bench, op, units, bar) for op in bench.ops)
    full = units[total]
    lm_seconds = tuple(((_time_on(full, bench.lm_head(t)),),) for t in TOKENS)
    lm_head = OpTable(LM_HEAD, TOKENS, (0,), (total,), lm_seconds)
    interference = {}
    for mechanism in Mechanism:
        try:
            factors = _interference(bench, mechanism, total)
        except Exception as exc:  # a mechanism the machine lacks is left out of the search
            logger.warning("no %s interference measured (%s); not searching it", mechanism, exc)
            continue
        if factors:
            interference[mechanism.value] = factors
    if Mechanism.CTA_LIMIT.value in interference:
        try:
            interference[SHARED_SMS] = _shared_interference(bench, total)
        except Exception as exc:  # as above: the layout is then left out of the search
            logger.warning("no shared-SM interference measured (%s); not searching it", exc)
    props = torch.cuda.get_device_properties(device)
    return OpTables(
        model=model,
        architecture_hash=spec.architecture_hash(),
        gpu=props.name,
        sm_count=total,
        gpu_memory_bytes=props.total_memory,
        num_layers=spec.num_layers,
        dtype_bytes=torch.finfo(dtype).bits // 8,
        ops=tables,
        lm_head=lm_head,
        interference=interference,
        launch_seconds=_launch_seconds(bench),
        kv_dtype_bytes=None if kv_dtype is None else kv_dtype.itemsize,
        date=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    )
