"""Benchmark workloads: lists of (input length, output length[, arrival time]) requests."""

from __future__ import annotations

import csv
import json
import random
from dataclasses import dataclass
from pathlib import Path

from nanoflow.errors import ConfigError


@dataclass(frozen=True)
class WorkloadRequest:
    input_len: int
    output_len: int
    arrival_time: float | None = None


def constant(input_len: int, output_len: int, num_requests: int) -> list[WorkloadRequest]:
    return [WorkloadRequest(input_len, output_len) for _ in range(num_requests)]


def from_trace(path: str | Path, num_requests: int | None = None) -> list[WorkloadRequest]:
    """A CSV (header: input_len,output_len[,arrival_time]) or JSON list of such objects."""
    path = Path(path)
    try:
        if path.suffix == ".json":
            rows = json.loads(path.read_text())
        else:
            with path.open(newline="") as f:
                rows = list(csv.DictReader(f))
        out = [
            WorkloadRequest(
                int(r["input_len"]),
                int(r["output_len"]),
                float(r["arrival_time"]) if r.get("arrival_time") not in (None, "") else None,
            )
            for r in rows
        ]
    except (OSError, ValueError, KeyError, TypeError, json.JSONDecodeError) as exc:
        raise ConfigError(
            f"cannot read trace {path}: {exc!r} (want input_len,output_len[,arrival_time])"
        ) from None
    if any(r.input_len < 1 or r.output_len < 1 for r in out):
        raise ConfigError(f"trace {path} has a request with a non-positive length")
    return out[:num_requests] if num_requests else out


def load_workload(name: str, num_requests: int, seed: int = 0) -> list[WorkloadRequest]:
    """``IN/OUT`` (constant lengths) or a trace file path."""
    if "/" in name and all(part.isdigit() for part in name.split("/")):
        input_len, output_len = (int(x) for x in name.split("/"))
        return constant(input_len, output_len, num_requests)
    if Path(name).is_file():
        return from_trace(name, num_requests)
    raise ConfigError(
        f"unknown workload {name!r}: give IN/OUT lengths (e.g. 512/512) or a trace file"
    )


def random_prompts(
    requests: list[WorkloadRequest], vocab_size: int, seed: int = 0
) -> list[list[int]]:
    """Random token ids of each request's input length (throughput does not depend on values)."""
    rng = random.Random(seed)
    high = max(2, vocab_size - 1)
    return [[rng.randrange(2, high) for _ in range(r.input_len)] for r in requests]
