"""Pipeline schedules as data: how an iteration's dense batch is cut into nano-batches, which
execution unit runs each op, and in which order the ops are launched."""

from __future__ import annotations

import enum
from dataclasses import asdict, dataclass, field
from typing import Any

from nanoflow.errors import ScheduleError
from nanoflow.runtime.graph import DECODE_ATTENTION, Resource


class Mechanism(enum.StrEnum):
    """How an execution unit's SM budget is enforced (docs/architecture.md, "The pipeline")."""

    CTA_LIMIT = "cta_limit"
    GREEN_CONTEXT = "green_context"


class LaunchOrder(enum.StrEnum):
    """How one stream's ops of several nano-batches are interleaved. A stream runs in order, so
    an op waiting for another unit holds back everything queued behind it: ``op_major`` and
    ``wavefront`` (op k of one nano-batch beside op k-1 of the next) queue a nano-batch's
    post-attention GEMMs behind the other's, so the GEMMs wait for every nano-batch's attention.
    ``alternating`` queues each nano-batch's whole stretch between two decode attentions (the
    layer's tail, then the next layer's head) before the next nano-batch's, so one nano-batch's
    GEMMs run while another's attention does (NanoFlow's pipeline)."""

    OP_MAJOR = "op_major"
    WAVEFRONT = "wavefront"
    ALTERNATING = "alternating"


@dataclass(frozen=True)
class UnitSpec:
    """An execution unit: a stream and the SMs its kernels may use (None: the whole GPU).

    ``priority`` is the stream's (CUDA's convention: lower runs first, -1 is high): where units
    share SMs, a high-priority unit's blocks are placed first as SMs free up.
    """

    name: str
    num_sms: int | None = None
    priority: int = 0


@dataclass(frozen=True)
class PipelineSchedule:
    """The shape of one iteration's pipeline.

    ``decode_shares`` and ``prefill_shares`` give each nano-batch's fraction of the iteration's
    decode and prefill tokens (they are split independently); ``op_units`` maps an op name or a
    resource class to a unit name. ``overlap=False`` runs the same nano-batches one after another
    on one stream (the cost of splitting, measured alone).
    """

    decode_shares: tuple[float, ...] = (1.0,)
    prefill_shares: tuple[float, ...] = (1.0,)
    units: tuple[UnitSpec, ...] = (UnitSpec("main"),)
    op_units: dict[str, str] = field(default_factory=lambda: {r.value: "main" for r in Resource})
    launch_order: LaunchOrder = LaunchOrder.OP_MAJOR
    mechanism: Mechanism = Mechanism.CTA_LIMIT
    overlap: bool = False

    def __post_init__(self) -> None:
        self.validate()

    @property
    def num_nano_batches(self) -> int:
        return len(self.decode_shares)

    def unit_of(self, op_name: str, resource: Resource) -> UnitSpec:
        name = self.op_units.get(op_name, self.op_units.get(resource.value))
        for unit in self.units:
            if unit.name == name:
                return unit
        raise ScheduleError(f"op {op_name!r} ({resource}) is mapped to no known unit")

    def validate(self) -> None:
        if len(self.decode_shares) != len(self.prefill_shares) or not self.decode_shares:
            raise ScheduleError("decode_shares and prefill_shares need one entry per nano-batch")
        for shares in (self.decode_shares, self.prefill_shares):
            if any(s < 0 for s in shares) or abs(sum(shares) - 1.0) > 1e-6:
                raise ScheduleError(f"nano-batch shares must be >= 0 and sum to 1, got {shares}")
        names = [u.name for u in self.units]
        if len(set(names)) != len(names):
            raise ScheduleError(f"unit names must be unique, got {names}")
        for key, unit in self.op_units.items():
            if unit not in names:
                raise ScheduleError(f"op_units maps {key!r} to unknown unit {unit!r}")
        for r in Resource:
            if r.value not in self.op_units:
                raise ScheduleError(f"op_units has no unit for resource class {r.value!r}")
        for unit in self.units:
            if unit.num_sms is not None and unit.num_sms < 1:
                raise ScheduleError(f"unit {unit.name!r} has a non-positive SM budget")

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["launch_order"] = self.launch_order.value
        data["mechanism"] = self.mechanism.value
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PipelineSchedule:
        try:
            return cls(
                decode_shares=tuple(float(s) for s in data["decode_shares"]),
                prefill_shares=tuple(float(s) for s in data["prefill_shares"]),
                units=tuple(
                    UnitSpec(u["name"], u.get("num_sms"), int(u.get("priority", 0)))
                    for u in data["units"]
                ),
                op_units=dict(data["op_units"]),
                launch_order=LaunchOrder(data.get("launch_order", "op_major")),
                mechanism=Mechanism(data.get("mechanism", "cta_limit")),
                overlap=bool(data.get("overlap", False)),
            )
        except (KeyError, TypeError, ValueError) as exc:
            if isinstance(exc, ScheduleError):
                raise
            raise ScheduleError(f"schedule is malformed: {exc!r}") from None


def split_counts(total: int, shares: tuple[float, ...]) -> list[int]:
    """Cut ``total`` items into parts proportional to ``shares`` (largest-remainder rounding)."""
    exact = [total * s for s in shares]
    counts = [int(x) for x in exact]
    order = sorted(range(len(shares)), key=lambda i: exact[i] - counts[i], reverse=True)
    for i in order[: total - sum(counts)]:
        counts[i] += 1
    return counts


def sequential_schedule() -> PipelineSchedule:
    """One nano-batch on one whole-GPU stream: the reference and the ablation baseline."""
    return PipelineSchedule()


def nano_batch_schedule(num_nano_batches: int = 2) -> PipelineSchedule:
    """Equal nano-batches run one after another: measures what splitting alone costs."""
    shares = tuple([1.0 / num_nano_batches] * num_nano_batches)
    return PipelineSchedule(decode_shares=shares, prefill_shares=shares)


def shared_sm_schedule(
    num_sms: int,
    attention_fraction: float = 0.5,
    num_nano_batches: int = 2,
    network_sms: int | None = None,
) -> PipelineSchedule:
    """GEMMs and the small memory-bound ops on the whole GPU; decode attention on a
    high-priority stream of its own, at most ``attention_fraction`` of the SMs' worth of CTAs,
    so it runs between another nano-batch's GEMM blocks instead of on SMs taken from them. The
    nano-batches alternate (``LaunchOrder.ALTERNATING``), so those GEMM blocks are there."""
    units = [UnitSpec("compute"), UnitSpec("attention", int(num_sms * attention_fraction), -1)]
    op_units = {r.value: "compute" for r in Resource} | {DECODE_ATTENTION: "attention"}
    return _overlapped(
        num_nano_batches, units, op_units, Mechanism.CTA_LIMIT, network_sms, LaunchOrder.ALTERNATING
    )


def default_overlapped_schedule(
    num_sms: int,
    num_nano_batches: int = 2,
    memory_fraction: float = 0.25,
    mechanism: Mechanism = Mechanism.CTA_LIMIT,
    network_sms: int | None = None,
) -> PipelineSchedule:
    """A partitioned overlapped schedule: GEMMs on most of the SMs, memory-bound ops (decode
    attention, norms, RoPE) on ``memory_fraction`` of them."""
    memory_sms = max(8, int(num_sms * memory_fraction))
    units = [UnitSpec("compute", num_sms - memory_sms), UnitSpec("memory", memory_sms)]
    op_units = {"compute": "compute", "memory": "memory", "network": "compute"}
    return _overlapped(num_nano_batches, units, op_units, mechanism, network_sms)


def _overlapped(
    num_nano_batches: int,
    units: list[UnitSpec],
    op_units: dict[str, str],
    mechanism: Mechanism,
    network_sms: int | None,
    launch_order: LaunchOrder = LaunchOrder.OP_MAJOR,
) -> PipelineSchedule:
    """Equal nano-batches over ``units``; with tensor parallelism the collectives get a small
    unit of their own (without one, network ops share the compute unit)."""
    shares = tuple([1.0 / num_nano_batches] * num_nano_batches)
    if network_sms is not None:
        units = [*units, UnitSpec("network", network_sms)]
        op_units = op_units | {"network": "network"}
    return PipelineSchedule(
        decode_shares=shares,
        prefill_shares=shares,
        units=tuple(units),
        op_units=op_units,
        launch_order=launch_order,
        mechanism=mechanism,
        overlap=True,
    )
