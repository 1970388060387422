"""``nanoflow tune``'s options; the settings it shares with the engine reuse the engine's fields
(help, choices, default) rather than restating them."""

from __future__ import annotations

from dataclasses import dataclass

from nanoflow.config import EngineConfig
from nanoflow.options import REQUIRED, option, option_like


@dataclass
class TuneOptions:
    model: str = option(REQUIRED, "registry name (e.g. llama-3-8b), checkpoint folder or builtin")
    load_format: str = option_like(EngineConfig, "load_format")
    workload: str = option("512/512", "IN/OUT lengths, a dataset name or a trace file")
    trials: int = option(200, "search trials (cost-model evaluations)")
    top_k: int = option(4, "candidates validated on the device")
    seed: int = option(0, "seed of the search and of the dummy weights")
    storage: str | None = option(None, "optuna storage that keeps the study, e.g. sqlite:///t.db")
    tables_in: str | None = option(
        None, "op tables JSON to reuse (skips profiling); 'roofline' for nominal H100 tables"
    )
    tables_out: str | None = option(None, "where to save the op tables")
    device: str = option_like(EngineConfig, "device")
    validate: bool | None = option(
        None, "measure the top candidates on the device (default: only on a GPU)"
    )
    max_num_seqs: int = option_like(EngineConfig, "max_num_seqs")
    max_batch: int = option(16384, "largest dense batch to try")
    batch_step: int = option(64, "the dense batches tried are multiples of this")
    num_kv_blocks: int | None = option_like(EngineConfig, "num_kv_blocks")
    kv_cache_dtype: str = option_like(EngineConfig, "kv_cache_dtype")
    quantization: str | None = option_like(EngineConfig, "quantization")
    command: str = ""  # the command line, recorded in the profile
