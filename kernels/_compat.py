"""Triton when it is installed; otherwise stand-ins, so a CPU-only install still imports every
kernel module for its PyTorch reference and fails only if a Triton kernel is actually launched."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only install: the references need no Triton
    triton = None
    tl = None

__all__ = [
    "as_rows",
    "cdiv",
    "check_num_ctas",
    "jit",
    "next_pow2",
    "num_warps_for",
    "sm_count",
    "tl",
    "triton",
]


class _Unavailable:
    """Stands in for a ``@triton.jit`` kernel when Triton is missing."""

    def __init__(self, fn: Callable[..., Any]) -> None:
        self.__name__ = fn.__name__

    def __getitem__(self, grid: Any) -> Callable[..., Any]:
        raise RuntimeError(
            f"{self.__name__} needs Triton, which is not installed: `pip install triton`, "
            "or set NANOFLOW_KERNELS=reference to use the PyTorch references"
        )


def jit(
    fn: Callable[..., Any] | None = None,
    *,
    do_not_specialize: tuple[str, ...] = (),
    do_not_specialize_on_alignment: tuple[str, ...] = (),
) -> Any:
    """``triton.jit`` when Triton is importable. ``do_not_specialize`` names the integer
    arguments that change from step to step (row counts, splits, the block tables' width):
    Triton would otherwise compile another binary whenever one of them turns 1 or a multiple
    of 16, and a step shape first seen mid-run would pay that compilation there.
    ``do_not_specialize_on_alignment`` names the pointers a step may pass at any row offset
    (a nano-batch's slice of per-token metadata), read one scalar at a time, where knowing
    16-byte alignment buys nothing."""

    def wrap(f: Callable[..., Any]) -> Any:
        if triton is None:
            return _Unavailable(f)
        return triton.jit(
            f,
            do_not_specialize=do_not_specialize or None,
            do_not_specialize_on_alignment=do_not_specialize_on_alignment or None,
        )

    return wrap(fn) if fn is not None else wrap


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def next_pow2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


@functools.cache
def _cuda_sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def sm_count(device: torch.device) -> int:
    """SMs of a CUDA device; a small stand-in for the CPU interpreter."""
    if device.type != "cuda":
        return 4
    return _cuda_sm_count(device.index if device.index is not None else torch.cuda.current_device())


def check_num_ctas(num_ctas: int | None) -> None:
    if num_ctas is not None and (not isinstance(num_ctas, int) or num_ctas < 1):
        raise ValueError(f"num_ctas must be a positive int or None, got {num_ctas!r}")


def as_rows(t: torch.Tensor, width: int, name: str) -> torch.Tensor:
    """``t`` as a 2-D ``[rows, width]`` view (never a copy: kernels may write through it)."""
    if t.shape[-1:] != (width,):
        raise ValueError(f"{name} must end in a dimension of {width}, got {tuple(t.shape)}")
    if t.stride(-1) != 1:
        raise ValueError(f"{name} must be contiguous in its last dimension")
    try:
        return t.view(-1, width)
    except RuntimeError as err:
        raise ValueError(f"{name} of strides {t.stride()} cannot be viewed as rows") from err


def num_warps_for(block: int, per_thread: int = 8) -> int:
    """Warps for a row-wise kernel over ``block`` elements: about ``per_thread`` elements (at
    least; more where 16 warps are not enough) per thread."""
    return max(1, min(16, block // (32 * per_thread)))
