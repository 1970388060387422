"""The whole tuning run, as `nanoflow tune` and the GPU script do it: op tables (profiled, or
read from JSON), search, validation of the top candidates on the device, and the profile."""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import optuna
import torch

from nanoflow.autotune.bound import PROFILE, tables_for
from nanoflow.autotune.options import TuneOptions
from nanoflow.autotune.search import (
    Candidate,
    SearchSpace,
    batch_limit,
    run_search,
    top_candidates,
)
from nanoflow.autotune.steady_state import WorkloadShape, steady_batch
from nanoflow.autotune.tables import OpTables, save_tables
from nanoflow.autotune.validate import Measured, validate
from nanoflow.config import KV_CACHE_DTYPES, EngineConfig, torch_dtype_named
from nanoflow.engine.engine_core import EngineCore
from nanoflow.errors import ConfigError
from nanoflow.measure import environment
from nanoflow.models.loader import resolve_model
from nanoflow.models.spec import ModelSpec
from nanoflow.runtime.graph import Resource
from nanoflow.runtime.profile import Profile, gpu_slug

logger = logging.getLogger(__name__)

ROOFLINE = "roofline"


@dataclass
class TuneResult:
    profile: Profile
    tables: OpTables
    candidates: list[Candidate]
    measured: list[Measured]
    study: optuna.Study
    engine: EngineCore | None = field(default=None, repr=False)


def _kv_dtype(opts: TuneOptions) -> torch.dtype | None:
    """The cache's element type; None for the model's own."""
    if opts.kv_cache_dtype == "auto":
        return None
    return torch_dtype_named(KV_CACHE_DTYPES[opts.kv_cache_dtype])


def _tables(opts: TuneOptions, spec: ModelSpec, device: torch.device) -> OpTables:
    """``--tables-in`` (a file or ``roofline``), else the ops profiled on ``device``."""
    return tables_for(
        opts.tables_in or PROFILE, spec, opts.model, device,
        kv_dtype=_kv_dtype(opts), quantization=opts.quantization,
    )  # fmt: skip


def _space(
    opts: TuneOptions,
    spec: ModelSpec,
    tables: OpTables,
    shape: WorkloadShape,
    cuda_graphs: bool,
):
    step = opts.batch_step
    limit = batch_limit(spec, tables, shape, opts.max_num_seqs, step, opts.max_batch)
    if limit == 0:
        raise ConfigError(
            f"not even a dense batch of {step} tokens fits the KV cache for workload "
            f"{opts.workload} beside the weights"
        )
    has_network = any(op.spec.resource is Resource.NETWORK for op in tables.ops)
    mechanisms = tables.mechanisms or ("cta_limit",)
    shared = tables.shares_sms and not has_network
    return SearchSpace(
        tables.sm_count, mechanisms, step, limit, step, has_network, cuda_graphs, shared
    )


def tune(opts: TuneOptions) -> TuneResult:
    started = time.perf_counter()
    spec, _ = resolve_model(opts.model)
    device = EngineConfig(device=opts.device).torch_device()
    tables = _tables(opts, spec, device)
    if opts.tables_out:
        save_tables(tables, opts.tables_out, {**environment(device), "command": opts.command})
    shape = WorkloadShape.from_workload(opts.workload, seed=opts.seed)
    # the validation engine, like any engine on one GPU, replays its iterations from graphs
    space = _space(opts, spec, tables, shape, cuda_graphs=device.type == "cuda")
    study_name = f"{Path(opts.model).name}-{gpu_slug(tables.gpu)}-{opts.workload}"
    study = run_search(tables, shape, space, opts.trials, opts.seed, opts.storage, study_name)
    candidates = top_candidates(study, opts.top_k)
    measured: list[Measured] = []
    engine = None
    if opts.validate if opts.validate is not None else device.type == "cuda":
        engine = EngineCore(
            EngineConfig(
                model=opts.model,
                load_format=opts.load_format,
                device=str(device),
                max_num_batched_tokens=max(c.dense_batch_size for c in candidates),
                num_kv_blocks=opts.num_kv_blocks,
                executor="sequential",
                max_num_seqs=opts.max_num_seqs,
                kv_cache_dtype=opts.kv_cache_dtype,
                quantization=opts.quantization,
            )
        )
        measured = validate(engine, candidates, shape)
    profile = _profile(opts, spec, tables, candidates, measured, shape, device)
    profile = dataclasses.replace(profile, tuning_seconds=time.perf_counter() - started)
    return TuneResult(profile, tables, candidates, measured, study, engine)


def _profile(
    opts: TuneOptions,
    spec: ModelSpec,
    tables: OpTables,
    candidates: list[Candidate],
    measured: list[Measured],
    shape: WorkloadShape,
    device: torch.device,
) -> Profile:
    best = measured[0].candidate if measured else candidates[0]
    env = environment(device)
    batch = steady_batch(best.dense_batch_size, shape)
    return Profile(
        model=opts.model,
        architecture_hash=spec.architecture_hash(),
        gpu_name=tables.gpu,
        sm_count=tables.sm_count,
        dense_batch_size=best.dense_batch_size,
        schedule=best.schedule,
        torch_version=env["torch"],
        triton_version=env["triton"],
        workload=opts.workload,
        kv_cache_dtype=opts.kv_cache_dtype,
        quantization=opts.quantization,
        predicted_iteration_s=best.predicted_iteration_s,
        measured_iteration_s=measured[0].iteration_s if measured else None,
        measured_tokens_per_s=measured[0].tokens_per_s if measured else None,
        command=opts.command,
        date=env["date"],
        extra={
            "tables": opts.tables_in or "profiled",
            "measured_on": (env["gpu"] or str(device)) if measured else None,
            "trials": opts.trials,
            "seed": opts.seed,
            "steady_batch": {
                "decodes": batch.decodes,
                "prefill_tokens": batch.prefill_tokens,
                "decode_context": batch.decode_context,
                "prompt_len": batch.prompt_len,
            },
            "candidates": [
                {
                    "dense_batch_size": m.candidate.dense_batch_size,
                    "schedule": m.candidate.schedule.to_dict(),
                    "predicted_iteration_s": m.candidate.predicted_iteration_s,
                    "measured_iteration_s": m.iteration_s,
                }
                for m in measured
            ],
        },
    )
