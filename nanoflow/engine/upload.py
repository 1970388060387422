"""Host-to-device uploads that never make the host wait for the GPU.

``torch.tensor(values, device="cuda")`` is a blocking copy, and a copy from pageable host memory
may first wait for the stream's earlier work while CUDA stages it: either makes the host wait for
the iteration in flight and undoes asynchronous scheduling. Values go through pinned memory
instead; PyTorch's pinned allocator keeps each block until the copies reading it have finished.
"""

from __future__ import annotations

import torch


def copy_to(dst: torch.Tensor, src: torch.Tensor) -> None:
    """Copy the host tensor ``src`` into ``dst`` without waiting for ``dst``'s device."""
    if dst.is_cuda:
        src = src.pin_memory()
    dst.copy_(src, non_blocking=True)


def to_device(values: list, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A new device tensor of ``values``, uploaded without waiting for the device."""
    return upload(torch.tensor(values, dtype=dtype), device)


def upload(host: torch.Tensor, device: torch.device) -> torch.Tensor:
    """The host tensor ``host`` on ``device``, uploaded without waiting for the device."""
    if device.type == "cuda":
        host = host.pin_memory()
    return host.to(device, non_blocking=True)
