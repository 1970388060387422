"""Tuning profiles: the schedule and token budget `nanoflow tune` chose for one model on one GPU,
with what it predicted and measured, saved as JSON at ``profiles/<model>/<gpu>.json``.

Loading checks everything a stale or misplaced profile could get wrong and says which it is, so
the engine never runs a schedule tuned for another model or GPU without being told.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from nanoflow.config import KV_CACHE_DTYPES, QUANTIZATIONS
from nanoflow.errors import ProfileError, ScheduleError
from nanoflow.runtime.schedule import Mechanism, PipelineSchedule

SCHEMA_VERSION = 1


@dataclass(frozen=True)
class Profile:
    model: str
    architecture_hash: str
    gpu_name: str | None
    sm_count: int | None
    dense_batch_size: int
    schedule: PipelineSchedule
    torch_version: str = torch.__version__
    triton_version: str | None = None
    workload: str = ""
    kv_cache_dtype: str = "auto"  # the KV cache it was tuned with; the engine must run the same
    quantization: str | None = None  # the weights' quantization it was tuned with, likewise
    predicted_iteration_s: float | None = None
    measured_iteration_s: float | None = None
    measured_tokens_per_s: float | None = None
    tuning_seconds: float | None = None
    command: str = ""
    date: str = ""
    extra: dict[str, Any] = field(default_factory=dict)
    schema_version: int = SCHEMA_VERSION

    @property
    def mechanism(self) -> Mechanism:
        return self.schedule.mechanism

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema_version": self.schema_version,
            "model": self.model,
            "architecture_hash": self.architecture_hash,
            "gpu_name": self.gpu_name,
            "sm_count": self.sm_count,
            "torch_version": self.torch_version,
            "triton_version": self.triton_version,
            "mechanism": self.mechanism.value,
            "dense_batch_size": self.dense_batch_size,
            "schedule": self.schedule.to_dict(),
            "workload": self.workload,
            "kv_cache_dtype": self.kv_cache_dtype,
            "quantization": self.quantization,
            "predicted_iteration_s": self.predicted_iteration_s,
            "measured_iteration_s": self.measured_iteration_s,
            "measured_tokens_per_s": self.measured_tokens_per_s,
            "tuning_seconds": self.tuning_seconds,
            "command": self.command,
            "date": self.date,
            "extra": self.extra,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Profile:
        """Raises KeyError, TypeError, ValueError or ScheduleError on a malformed dict."""
        schedule = PipelineSchedule.from_dict(data["schedule"])
        if data.get("mechanism", schedule.mechanism.value) != schedule.mechanism.value:
            raise ValueError("the mechanism differs from the schedule's")
        dense = int(data["dense_batch_size"])
        if dense < 1:
            raise ValueError(f"dense_batch_size must be positive, got {dense}")
        kv_cache_dtype = str(data.get("kv_cache_dtype", "auto"))
        if kv_cache_dtype != "auto" and kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ValueError(f"unknown kv_cache_dtype {kv_cache_dtype!r}")
        quantization = data.get("quantization")
        if quantization is not None and quantization not in QUANTIZATIONS:
            raise ValueError(f"unknown quantization {quantization!r}")
        sm_count = data.get("sm_count")
        wanted = max((u.num_sms or 0) for u in schedule.units)
        if sm_count is not None and wanted > int(sm_count):
            raise ValueError(f"a unit asks for {wanted} SMs of the GPU's {sm_count}")
        return cls(
            model=str(data["model"]),
            architecture_hash=str(data["architecture_hash"]),
            gpu_name=data.get("gpu_name"),
            sm_count=None if sm_count is None else int(sm_count),
            dense_batch_size=dense,
            schedule=schedule,
            torch_version=str(data.get("torch_version", "")),
            triton_version=data.get("triton_version"),
            workload=str(data.get("workload", "")),
            kv_cache_dtype=kv_cache_dtype,
            quantization=quantization,
            predicted_iteration_s=_optional_float(data.get("predicted_iteration_s")),
            measured_iteration_s=_optional_float(data.get("measured_iteration_s")),
            measured_tokens_per_s=_optional_float(data.get("measured_tokens_per_s")),
            tuning_seconds=_optional_float(data.get("tuning_seconds")),
            command=str(data.get("command", "")),
            date=str(data.get("date", "")),
            extra=dict(data.get("extra") or {}),
            schema_version=int(data["schema_version"]),
        )


def _optional_float(value: Any) -> float | None:
    return None if value is None else float(value)


def gpu_slug(name: str | None) -> str:
    """A file name for a GPU: ``NVIDIA H100 80GB HBM3`` -> ``nvidia-h100-80gb-hbm3``."""
    return re.sub(r"[^a-z0-9]+", "-", (name or "cpu").lower()).strip("-")


def profile_path(
    model: str, gpu_name: str | None, root: str | Path = "profiles", variant: str | None = None
) -> Path:
    """The conventional place: ``profiles/<model>/<gpu>.json``, or ``<gpu>-<variant>.json`` for
    a profile tuned with other weights (e.g. ``fp8``) beside the default one."""
    stem = gpu_slug(gpu_name) if variant is None else f"{gpu_slug(gpu_name)}-{variant}"
    return Path(root) / Path(model).name / f"{stem}.json"


def save_profile(profile: Profile, path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(profile.to_dict(), indent=2) + "\n")


def load_profile(path: str | Path, architecture_hash: str, device: torch.device) -> Profile:
    """A profile checked against the model (its ``ModelSpec.architecture_hash()``) and, on a
    GPU, the device it is about to run on."""
    data = _read_json(Path(path))
    version = data.get("schema_version") if isinstance(data, dict) else None
    if not isinstance(version, int):
        raise ProfileError(f"profile {path} has no schema_version; is it a nanoflow profile?")
    if version != SCHEMA_VERSION:
        age = "an older" if version < SCHEMA_VERSION else "a newer"
        fix = "re-run `nanoflow tune`" if version < SCHEMA_VERSION else "upgrade nanoflow"
        raise ProfileError(
            f"profile {path} has schema version {version}, made by {age} nanoflow (this one "
            f"reads version {SCHEMA_VERSION}); {fix}"
        )
    try:
        profile = Profile.from_dict(data)
    except (KeyError, TypeError, ValueError, ScheduleError) as exc:
        raise ProfileError(
            f"profile {path} is malformed ({exc}); re-run `nanoflow tune` to make a new one"
        ) from None
    if profile.architecture_hash != architecture_hash:
        raise ProfileError(
            f"profile {path} was made for model {profile.model!r} (architecture "
            f"{profile.architecture_hash}), not this model (architecture "
            f"{architecture_hash}); tune this model with `nanoflow tune`"
        )
    if device.type == "cuda":
        _check_gpu(profile, Path(path), device)
    return profile


def _read_json(path: Path) -> Any:
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ProfileError(
            f"profile {path} does not exist; make one with `nanoflow tune --out {path}`"
        ) from None
    except OSError as exc:
        raise ProfileError(f"cannot read profile {path}: {exc}") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise ProfileError(
            f"profile {path} is not valid JSON ({exc}); it may be truncated, re-run `nanoflow tune`"
        ) from None


def _check_gpu(profile: Profile, path: Path, device: torch.device) -> None:
    props = torch.cuda.get_device_properties(device)
    if profile.gpu_name != props.name or profile.sm_count != props.multi_processor_count:
        raise ProfileError(
            f"profile {path} was tuned on {profile.gpu_name} ({profile.sm_count} SMs), but this "
            f"GPU is {props.name} ({props.multi_processor_count} SMs); tune on this GPU"
        )
