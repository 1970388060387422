"""Engine options in one validated dataclass (what the CLI flags and ``LLM(...)`` kwargs set)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from nanoflow.errors import ConfigError

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# the KV cache's element type: the model's, or 8-bit floats (e4m3, unscaled), which halve what
# decode attention reads and double the sequences the cache holds
KV_CACHE_DTYPES = {"fp8": torch.float8_e4m3fn}
EXECUTORS = ("auto", "sequential", "nanobatch", "overlapped")


@dataclass
class EngineConfig:
    model: str = "builtin"
    tokenizer: str | None = None
    load_format: str = "auto"
    dtype: str = "auto"
    device: str = "auto"
    seed: int = 0
    block_size: int = 16
    max_num_batched_tokens: int | None = None
    max_num_seqs: int = 512
    max_model_len: int | None = None
    gpu_memory_utilization: float = 0.9
    num_kv_blocks: int | None = None
    cpu_kv_cache_gib: float = 1.0
    expected_output_len: int | None = None
    executor: str = "auto"
    profile: str | None = None
    tensor_parallel_size: int = 1
    offload_weights: str | None = None
    offload_fraction: float | None = None
    async_scheduling: bool | None = None  # None: on for CUDA without tensor parallelism
    # replay iterations from CUDA graphs, one per padded shape; None: on for a dense model on one
    # CUDA GPU without weight offload (the combinations measured on a GPU)
    cuda_graphs: bool | None = None
    # reuse the K/V of full prompt blocks another request already computed
    enable_prefix_caching: bool = False
    # GiB of host memory that keeps prefix blocks evicted from the GPU (0: none)
    kv_offload_gib: float = 0.0
    kv_cache_dtype: str = "auto"  # auto: the model's dtype; fp8: float8 e4m3

    def __post_init__(self) -> None:
        if self.load_format not in ("auto", "safetensors", "dummy"):
            raise ConfigError(
                f"load_format must be auto, safetensors or dummy, not {self.load_format!r}"
            )
        if self.dtype != "auto" and self.dtype not in DTYPES:
            raise ConfigError(
                f"dtype must be auto or one of {', '.join(DTYPES)}, not {self.dtype!r}"
            )
        if self.executor not in EXECUTORS:
            raise ConfigError(f"executor must be one of {', '.join(EXECUTORS)}")
        if self.block_size not in (8, 16, 32, 64, 128):
            raise ConfigError("block_size must be a power of two between 8 and 128")
        if not 0.05 <= self.gpu_memory_utilization <= 0.99:
            raise ConfigError("gpu_memory_utilization must be between 0.05 and 0.99")
        if self.max_num_batched_tokens is not None and self.max_num_batched_tokens < 1:
            raise ConfigError("max_num_batched_tokens must be positive")
        if self.max_num_seqs < 1:
            raise ConfigError("max_num_seqs must be positive")
        if self.tensor_parallel_size < 1:
            raise ConfigError("tensor_parallel_size must be positive")
        if self.cuda_graphs and self.tensor_parallel_size > 1:
            raise ConfigError("cuda_graphs is not supported with tensor parallelism yet")
        if self.kv_offload_gib < 0:
            raise ConfigError("kv_offload_gib must be >= 0")
        if self.kv_offload_gib and not self.enable_prefix_caching:
            raise ConfigError("kv_offload_gib keeps cached prefixes: enable_prefix_caching too")
        if self.kv_offload_gib and self.tensor_parallel_size > 1:
            raise ConfigError("kv_offload_gib is not supported with tensor parallelism yet")
        if self.cuda_graphs and self.offload_weights is not None:
            # the prefetch planner keeps host state across steps (which copy, into which slot)
            raise ConfigError("cuda_graphs is not supported with offload_weights yet")
        if self.offload_weights not in (None, "cpu"):
            raise ConfigError(
                f"offload_weights must be None or 'cpu', not {self.offload_weights!r}"
            )
        if self.offload_fraction is not None and not 0.0 <= self.offload_fraction <= 1.0:
            raise ConfigError("offload_fraction must be between 0 and 1")
        if self.kv_cache_dtype != "auto" and self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ConfigError(
                f"kv_cache_dtype must be auto or {', '.join(KV_CACHE_DTYPES)}, "
                f"not {self.kv_cache_dtype!r}"
            )

    def torch_device(self) -> torch.device:
        """The device with an explicit index on CUDA (``cuda`` means the current GPU)."""
        name = self.device
        if name == "auto":
            name = "cuda" if torch.cuda.is_available() else "cpu"
        device = torch.device(name)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        return device

    def use_async_scheduling(self) -> bool:
        if self.async_scheduling is not None:
            return self.async_scheduling
        return self.torch_device().type == "cuda" and self.tensor_parallel_size == 1

    def torch_dtype(self, device: torch.device) -> torch.dtype:
        if self.dtype == "auto":
            return torch.bfloat16 if device.type == "cuda" else torch.float32
        return DTYPES[self.dtype]

    def torch_kv_dtype(self, device: torch.device) -> torch.dtype:
        if self.kv_cache_dtype == "auto":
            return self.torch_dtype(device)
        return KV_CACHE_DTYPES[self.kv_cache_dtype]
