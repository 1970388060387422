"""Weight offload for models larger than GPU memory (DeepSpeed-Inference style).

Some layers keep their weights in pinned host memory, each packed into one flat buffer. Before
such a layer runs, its buffer is copied into one of ``num_slots`` GPU slots (double-buffered by
default) on a copy stream of its own, so the copy of the next offloaded layer overlaps the compute
of the current one (and of the resident layers in between: the offloaded layers are spread evenly
over the depth). Events carry the two dependencies: a layer's ops wait until its copy is done
(``weights_in`` op), and a slot is overwritten only after every nano-batch of its previous layer
is done with it (``weights_out`` op). How many layers are offloaded follows from free GPU memory.

The bookkeeping (which copy to issue when, into which slot) is :class:`PrefetchPlanner`, pure and
tested without a GPU; on CPU "device" and "host" are the same memory and copies run inline.
"""

from __future__ import annotations

import logging
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch

from nanoflow.config import EngineConfig
from nanoflow.distributed.parallel import ParallelGroup
from nanoflow.errors import ConfigError
from nanoflow.models.quantization import flat_tensors, from_flat, is_quantized_linear
from nanoflow.models.spec import ModelSpec
from nanoflow.models.weights import expected_shapes, load_safetensors
from nanoflow.runtime.batch import NanoBatch, StepBuffers
from nanoflow.runtime.graph import OpSpec, Resource
from nanoflow.runtime.ops import Op

logger = logging.getLogger(__name__)

ALIGN_BYTES = 256
KV_RESERVE_FRACTION = 0.10  # of GPU memory, kept for the KV cache when choosing resident layers
_ACTIVATION_SLACK_BYTES = 2 << 30
_REPLICATED = ("layernorm.weight", "block_sparse_moe.gate.weight")

Layout = tuple[tuple[str, tuple[int, ...], torch.dtype, int], ...]


def layer_bytes(spec: ModelSpec, dtype: torch.dtype, tp_size: int = 1, fp8: bool = False) -> int:
    """Bytes of one layer's weight shard once packed (with alignment padding); with ``fp8`` the
    dense GEMM weights are one byte an element plus an fp32 scale a row."""
    total = 0
    for name, shape in expected_shapes(spec).items():
        if name.startswith("model.layers.0."):
            numel = torch.Size(shape).numel()
            numel = numel if name.endswith(_REPLICATED) else numel // tp_size
            if fp8 and is_quantized_linear(name):
                total += numel + 4 * shape[0] + 2 * ALIGN_BYTES
            else:
                total += numel * dtype.itemsize + ALIGN_BYTES
    return total


def spread_layers(count: int, num_layers: int) -> tuple[int, ...]:
    """``count`` layer indices spread evenly over the depth, so resident layers sit between
    offloaded ones and give their copies compute to hide behind."""
    return tuple(sorted({(2 * i + 1) * num_layers // (2 * count) for i in range(count)}))


def num_offloaded_layers(
    config: EngineConfig,
    spec: ModelSpec,
    device: torch.device,
    dtype: torch.dtype,
    tp: int,
    fp8: bool = False,
) -> int:
    """``offload_fraction`` of the layers if given; else all on CPU; else as few as leave room
    for the slots, the activations and a KV cache of ``KV_RESERVE_FRACTION`` of the GPU."""
    if config.offload_fraction is not None:
        return round(config.offload_fraction * spec.num_layers)
    if device.type != "cuda":
        return spec.num_layers
    free, total = torch.cuda.mem_get_info(device)
    per_layer = layer_bytes(spec, dtype, tp, fp8)
    embed = spec.vocab_size * spec.hidden_size * dtype.itemsize // tp
    reserve = (
        total * (1 - config.gpu_memory_utilization + KV_RESERVE_FRACTION)
        + _ACTIVATION_SLACK_BYTES
        + (OffloadPlan.num_slots + 2) * per_layer  # slots, fusing and the runner's reserve
        + embed * (1 if spec.tie_word_embeddings else 2)
    )
    resident = max(0, int((free - reserve) // per_layer))
    return max(0, spec.num_layers - resident)


def plan_offload(
    config: EngineConfig,
    spec: ModelSpec,
    device: torch.device,
    dtype: torch.dtype,
    group: ParallelGroup,
    quantization: str | None = None,
) -> OffloadPlan | None:
    """The offload plan for an engine (None: offload off, or every layer fits). Allocates the GPU
    slots now, before the KV cache is sized from what memory is left."""
    if config.offload_weights is None:
        return None
    fp8 = quantization == "fp8"
    count = num_offloaded_layers(config, spec, device, dtype, group.size, fp8)
    if count == 0:
        logger.info("weight offload: every layer fits on the device, none offloaded")
        return None
    layers = spread_layers(count, spec.num_layers)
    plan = OffloadPlan(layers, device, dtype, group.size, spec, fp8)
    logger.info(
        "weight offload: %d of %d layers in host memory, %d GPU slots of %.2f GiB",
        count, spec.num_layers, plan.num_slots, plan.slot_bytes / 2**30,
    )  # fmt: skip
    return plan


def load_split_weights(
    spec: ModelSpec,
    path: Path | None,
    load_format: str,
    device: torch.device,
    dtype: torch.dtype,
    seed: int,
    host_layers: tuple[int, ...],
) -> dict[str, torch.Tensor]:
    """Checkpoint tensors with the ``host_layers`` on the host and the rest on ``device``.

    Dummy weights are drawn on the device one tensor at a time (the same values as
    ``dummy_weights``) and the host layers' tensors moved out at once, so the device never
    holds more than one of them. A safetensors checkpoint is read into host memory first.
    """
    host = torch.device("cpu")

    def place(name: str) -> torch.device:
        parts = name.split(".")
        in_host_layer = parts[1] == "layers" and int(parts[2]) in host_layers
        return host if in_host_layer else device

    if load_format != "dummy":
        weights = load_safetensors(spec, path, host, dtype)  # type: ignore[arg-type]
        return {name: t.to(place(name)) for name, t in weights.items()}
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    weights = {}
    for name, shape in expected_shapes(spec).items():
        if name.endswith("layernorm.weight") or name == "model.norm.weight":
            t = torch.ones(shape, device=device, dtype=dtype)
        else:
            t = torch.empty(shape, device=device, dtype=dtype).normal_(0.0, 0.02, generator=gen)
        weights[name] = t.to(place(name))
    return weights


def layout_of(weights: dict[str, torch.Tensor]) -> Layout:
    entries, offset = [], 0
    for name, t in weights.items():
        entries.append((name, tuple(t.shape), t.dtype, offset))
        offset += -(-t.numel() * t.element_size() // ALIGN_BYTES) * ALIGN_BYTES
    return tuple(entries)


def layout_bytes(layout: Layout) -> int:
    name, shape, dtype, offset = layout[-1]
    return offset + torch.Size(shape).numel() * dtype.itemsize


def views(flat: torch.Tensor, layout: Layout) -> dict[str, torch.Tensor]:
    """Typed tensors over a flat byte buffer, one per layout entry."""
    out = {}
    for name, shape, dtype, offset in layout:
        nbytes = torch.Size(shape).numel() * dtype.itemsize
        out[name] = flat[offset : offset + nbytes].view(dtype).view(shape)
    return out


def pinned_bytes(nbytes: int, pin: bool) -> torch.Tensor:
    """A flat host buffer, page-locked with ``cudaHostRegister`` when ``pin`` (the caller
    unregisters it before it is freed).

    Not ``pin_memory()``: torch's pinned allocator rounds every block up to a power of two, which
    for a 1.6 GiB layer wastes 0.4 GiB of host memory per layer.
    """
    buffer = torch.empty(nbytes, dtype=torch.uint8)
    if pin:
        err = torch.cuda.cudart().cudaHostRegister(buffer.data_ptr(), nbytes, 0)
        if int(err) != 0:
            raise RuntimeError(f"cudaHostRegister of {nbytes} bytes failed with error {err}")
    return buffer


def _unregister(pointers: list[int]) -> None:
    for ptr in pointers:
        torch.cuda.cudart().cudaHostUnregister(ptr)


class PrefetchPlanner:
    """When to copy which offloaded layer into which slot, over the endless sequence of uses
    (use ``u`` is offloaded layer ``u % n``, bound to slot ``(u % n) % num_slots``).

    A copy may be issued once the slot's previous user has been launched entirely (its release
    events exist); copies are issued in use order, as far ahead as the slots allow, which also
    prefetches the next iteration's first layers while this one finishes.
    """

    def __init__(self, num_layers: int, num_slots: int) -> None:
        self.num_layers = num_layers
        self.num_slots = num_slots
        self.next_use = 0
        self.issued = 0
        self.slot_user: list[int | None] = [None] * num_slots

    def slot_of(self, layer: int) -> int:
        return layer % self.num_slots

    def begin(self, layer: int) -> list[int]:
        """Offloaded layer ``layer`` starts launching (all earlier uses are launched): the uses
        whose copies to issue now, in order."""
        use = self.next_use
        if use % self.num_layers != layer:
            raise RuntimeError(f"offloaded layer {layer} ran out of order (expected use {use})")
        self.next_use += 1
        issue = []
        while True:
            slot = self.slot_of(self.issued % self.num_layers)
            previous = self.slot_user[slot]
            if previous is not None and previous >= use:
                return issue
            self.slot_user[slot] = self.issued
            issue.append(self.issued)
            self.issued += 1


class Copier(Protocol):
    def copy(self, dst: torch.Tensor, src: torch.Tensor, after: list[Any]) -> Any: ...
    def wait(self, event: Any) -> None: ...
    def record(self) -> Any: ...


class InlineCopier:
    """CPU: ops run when launched, so a copy issued after its slot's last user is safe at once."""

    def copy(self, dst: torch.Tensor, src: torch.Tensor, after: list[Any]) -> None:
        dst.copy_(src)

    def wait(self, event: Any) -> None:
        return None

    def record(self) -> None:
        return None


class CudaCopier:
    """Host-to-device copies on a stream of their own, ordered by CUDA events."""

    def __init__(self, device: torch.device) -> None:
        self.stream = torch.cuda.Stream(device)

    def copy(self, dst: torch.Tensor, src: torch.Tensor, after: list[Any]) -> torch.cuda.Event:
        for event in after:
            self.stream.wait_event(event)
        with torch.cuda.stream(self.stream):
            dst.copy_(src, non_blocking=True)
        done = torch.cuda.Event()
        done.record(self.stream)
        return done

    def wait(self, event: Any) -> None:
        if event is not None:
            torch.cuda.current_stream().wait_event(event)

    def record(self) -> torch.cuda.Event:
        event = torch.cuda.Event()
        event.record()
        return event


@dataclass
class OffloadPlan:
    """The offloaded layers, their GPU slots, and (after :meth:`attach`) their host buffers."""

    host_layers: tuple[int, ...]
    device: torch.device
    dtype: torch.dtype
    tp_size: int
    spec: ModelSpec
    fp8: bool = False
    num_slots = 2
    slot_bytes: int = 0
    slots: list[torch.Tensor] = field(default_factory=list)
    host: list[torch.Tensor] = field(default_factory=list)
    copier: Any = None

    def __post_init__(self) -> None:
        self.slot_bytes = layer_bytes(self.spec, self.dtype, self.tp_size, self.fp8)
        self.slots = [
            torch.empty(self.slot_bytes, dtype=torch.uint8, device=self.device)
            for _ in range(self.num_slots)
        ]
        cuda = self.device.type == "cuda"
        self.copier = CudaCopier(self.device) if cuda else InlineCopier()
        self.planner = PrefetchPlanner(len(self.host_layers), self.num_slots)

    def attach(self, model: Any) -> None:
        """Pack each offloaded layer's (fused, host) weights into one pinned buffer, point the
        layer at its slot and wrap its ops between ``weights_in`` and ``weights_out``."""
        layout = layout_of(flat_tensors(model.layers[self.host_layers[0]].w))
        if layout_bytes(layout) > self.slot_bytes:
            raise ConfigError("offloaded layers are larger than their GPU slots")
        slot_views = [views(s, layout) for s in self.slots]
        self.ready: list[Any] = [None] * self.num_slots
        self.released: list[list[Any]] = [[] for _ in range(self.num_slots)]
        self.acquired: list[set[int]] = [set() for _ in range(self.num_slots)]
        self.pending: dict[int, int] = {}  # slot -> layer whose copy waits for its releases
        self._seen: set[int] = set()
        self._active: int | None = None
        nbytes = layout_bytes(layout)
        pin = self.device.type == "cuda"
        for j, index in enumerate(self.host_layers):
            layer = model.layers[index]
            tensors = flat_tensors(layer.w)
            if layout_of(tensors) != layout:
                raise ConfigError(f"layer {index} differs in shape from the other offloaded ones")
            flat = pinned_bytes(nbytes, pin)
            for name, t in views(flat, layout).items():
                t.copy_(tensors[name])
            self.host.append(flat)
            layer.w = from_flat(slot_views[self.planner.slot_of(j)])
            model.layer_ops[index] = [
                Op(OpSpec("weights_in", Resource.MEMORY), self._acquire_fn(j)),
                *model.layer_ops[index],
                Op(OpSpec("weights_out", Resource.MEMORY), self._release_fn(j)),
            ]
        if pin:  # a finalizer runs before the plan's attributes (the buffers) are freed
            weakref.finalize(self, _unregister, [h.data_ptr() for h in self.host])

    def _acquire_fn(self, j: int):
        def weights_in(b: StepBuffers, nb: NanoBatch, sms: int | None) -> None:
            slot = self.planner.slot_of(j)
            if self._active != j or nb.index in self._seen:  # the first nano-batch of a use
                self._active, self._seen = j, set()
                for use in self.planner.begin(j):
                    self._issue_when_free(use % len(self.host_layers))
            if self.pending.get(slot) == j:
                raise RuntimeError(
                    "an offloaded layer is launched before every nano-batch has launched the "
                    "layer that holds its slot: this launch order needs two slots or more"
                )
            self._seen.add(nb.index)
            self.acquired[slot].add(nb.index)
            self.copier.wait(self.ready[slot])

        return weights_in

    def _release_fn(self, j: int):
        def weights_out(b: StepBuffers, nb: NanoBatch, sms: int | None) -> None:
            slot = self.planner.slot_of(j)
            self.released[slot].append(self.copier.record())
            if slot in self.pending and self._slot_free(slot):
                self._issue(self.pending.pop(slot))

        return weights_out

    def _slot_free(self, slot: int) -> bool:
        """Every nano-batch that took the slot's layer has launched its release. An
        alternating launch order starts a layer's first nano-batch before the last one has
        finished launching the layer before."""
        return len(self.released[slot]) == len(self.acquired[slot])

    def _issue_when_free(self, j: int) -> None:
        slot = self.planner.slot_of(j)
        if self._slot_free(slot):
            self._issue(j)
        else:
            self.pending[slot] = j

    def _issue(self, j: int) -> None:
        slot = self.planner.slot_of(j)
        after, self.released[slot], self.acquired[slot] = self.released[slot], [], set()
        src = self.host[j]
        self.ready[slot] = self.copier.copy(self.slots[slot][: src.numel()], src, after)
