"""Engine and server options, each a dataclass field that carries its help text: the CLI's
flags, their defaults and choices, and the ``LLM(...)`` keyword arguments all come from here."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from nanoflow.errors import ConfigError
from nanoflow.options import option

if TYPE_CHECKING:
    import torch

# torch dtypes by name, resolved when an engine starts (the CLI's parser imports no torch)
DTYPES = {"float32": "float32", "float16": "float16", "bfloat16": "bfloat16"}
# the KV cache's element type: the model's, or 8-bit floats (e4m3, unscaled), which halve what
# decode attention reads and double the sequences the cache holds
KV_CACHE_DTYPES = {"fp8": "float8_e4m3fn"}
# weight and activation quantization: fp8 is e4m3 W8A8 (per-output-channel weight scales, per-token
# activation scales) for the dense layers' GEMMs
QUANTIZATIONS = ("fp8",)
EXECUTORS = ("auto", "sequential", "nanobatch", "overlapped")
LOAD_FORMATS = ("auto", "safetensors", "dummy")
BLOCK_SIZES = (8, 16, 32, 64, 128)


def torch_dtype_named(name: str) -> torch.dtype:
    import torch

    return getattr(torch, name)


@dataclass
class EngineConfig:
    model: str = "builtin"  # the CLI's positional argument
    tokenizer: str | None = option(None, "tokenizer folder (default: the model's)")
    load_format: str = option(
        "auto",
        "the checkpoint's safetensors (auto), or random weights of the real shapes (dummy), "
        "for benchmarks whose throughput does not depend on the weights",
        LOAD_FORMATS,
    )
    dtype: str = option(
        "auto",
        "weights' and activations' dtype (auto: bfloat16 on a GPU, float32 on a CPU)",
        ("auto", *DTYPES),
    )
    device: str = option("auto", "cpu, cuda or cuda:N (auto: the GPU when there is one)")
    seed: int = option(0, "seed of dummy weights and of sampling without a per-request seed")
    block_size: int = option(16, "tokens per KV-cache block", BLOCK_SIZES)
    max_num_batched_tokens: int | None = option(
        None, "per-iteration token budget (default: the profile's, else 2048)"
    )
    max_num_seqs: int = option(512, "most sequences running at once")
    max_model_len: int | None = option(
        None, "longest prompt + output in tokens (default: the model's, as the KV cache allows)"
    )
    gpu_memory_utilization: float = option(
        0.9, "fraction of the GPU's memory the engine may take (weights, activations, KV cache)"
    )
    num_kv_blocks: int | None = option(
        None, "KV-cache blocks to allocate (default: what gpu_memory_utilization leaves room for)"
    )
    cpu_kv_cache_gib: float = option(1.0, "GiB of KV cache on a CPU device")
    expected_output_len: int | None = option(
        None,
        "output tokens a request is expected to produce when admission predicts its KV memory "
        "(default: its max_tokens)",
    )
    executor: str = option(
        "auto",
        "how an iteration runs: the profile's schedule, else sequential (auto); one stream "
        "(sequential); nano-batches one after another (nanobatch); the overlapped pipeline",
        EXECUTORS,
    )
    profile: str | None = option(None, "tuning profile JSON from `nanoflow tune`")
    tensor_parallel_size: int = option(1, "GPUs the model is split over (tensor parallelism)")
    offload_weights: str | None = option(
        None,
        "keep the layers that do not fit on the GPU in pinned host memory, streamed in",
        ("cpu",),
    )
    offload_fraction: float | None = option(
        None, "fraction of layers to offload (default: as few as GPU memory allows)"
    )
    async_scheduling: bool | None = option(
        None,
        "plan the next iteration while the GPU runs this one (default: on for CUDA without "
        "tensor parallelism)",
    )
    cuda_graphs: bool | None = option(
        None,
        "replay iterations from CUDA graphs, one per padded step shape (default: on for a "
        "dense model on one GPU without weight offload)",
    )
    enable_prefix_caching: bool = option(
        False, "reuse the K/V of full prompt blocks that an earlier request computed"
    )
    kv_offload_gib: float = option(
        0.0,
        "host memory (GiB) that keeps prefix blocks evicted from the GPU, for the next round of "
        "a conversation (needs --enable-prefix-caching)",
    )
    kv_cache_dtype: str = option(
        "auto",
        "the KV cache's element type: the model's (auto) or float8 e4m3 (fp8), which halves the "
        "bytes decode attention reads and doubles the sequences the cache holds",
        ("auto", *KV_CACHE_DTYPES),
    )
    quantization: str | None = option(
        None,
        "fp8: e4m3 weights with per-channel scales (computed at load time from an unquantized "
        "checkpoint) and per-token activation scales for the dense GEMMs (default: the "
        "checkpoint's own quantization_config, else none)",
        QUANTIZATIONS,
    )

    def __post_init__(self) -> None:
        if self.quantization not in (None, *QUANTIZATIONS):
            raise ConfigError(
                f"quantization must be None or {', '.join(QUANTIZATIONS)}, "
                f"not {self.quantization!r}"
            )
        if self.load_format not in LOAD_FORMATS:
            raise ConfigError(
                f"load_format must be auto, safetensors or dummy, not {self.load_format!r}"
            )
        if self.dtype != "auto" and self.dtype not in DTYPES:
            raise ConfigError(
                f"dtype must be auto or one of {', '.join(DTYPES)}, not {self.dtype!r}"
            )
        if self.executor not in EXECUTORS:
            raise ConfigError(f"executor must be one of {', '.join(EXECUTORS)}")
        if self.block_size not in BLOCK_SIZES:
            raise ConfigError("block_size must be a power of two between 8 and 128")
        if not 0.05 <= self.gpu_memory_utilization <= 0.99:
            raise ConfigError("gpu_memory_utilization must be between 0.05 and 0.99")
        if self.max_num_batched_tokens is not None and self.max_num_batched_tokens < 1:
            raise ConfigError("max_num_batched_tokens must be positive")
        if self.max_num_seqs < 1:
            raise ConfigError("max_num_seqs must be positive")
        for name in ("max_model_len", "num_kv_blocks", "expected_output_len"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)}")
        if self.cpu_kv_cache_gib <= 0:
            raise ConfigError("cpu_kv_cache_gib must be positive")
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
        if self.device != "auto":  # fail here, not in an engine process started later
            self._named_device()
        if self.kv_cache_dtype != "auto" and self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ConfigError(
                f"kv_cache_dtype must be auto or {', '.join(KV_CACHE_DTYPES)}, "
                f"not {self.kv_cache_dtype!r}"
            )

    def _named_device(self) -> torch.device:
        """The device ``device`` names, checked against what this torch can run on."""
        import torch

        name = self.device
        if name == "auto":
            name = "cuda" if torch.cuda.is_available() else "cpu"
        try:
            device = torch.device(name)
        except RuntimeError:
            raise ConfigError(f"device must be auto, cpu, cuda or cuda:N, not {name!r}") from None
        if device.type not in ("cpu", "cuda"):
            raise ConfigError(f"device must be auto, cpu, cuda or cuda:N, not {name!r}")
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ConfigError(
                f"device {name!r}: this torch sees no CUDA GPU (a CPU-only build, or no driver); "
                "use --device cpu"
            )
        return device

    def torch_device(self) -> torch.device:
        """The device with an explicit index on CUDA (``cuda`` means the current GPU)."""
        import torch

        device = self._named_device()
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        return device

    def use_async_scheduling(self) -> bool:
        if self.async_scheduling is not None:
            return self.async_scheduling
        return self.torch_device().type == "cuda" and self.tensor_parallel_size == 1

    def torch_dtype(self, device: torch.device) -> torch.dtype:
        if self.dtype == "auto":
            return torch_dtype_named("bfloat16" if device.type == "cuda" else "float32")
        return torch_dtype_named(DTYPES[self.dtype])

    def torch_kv_dtype(self, device: torch.device) -> torch.dtype:
        if self.kv_cache_dtype == "auto":
            return self.torch_dtype(device)
        return torch_dtype_named(KV_CACHE_DTYPES[self.kv_cache_dtype])
