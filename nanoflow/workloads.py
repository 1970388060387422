"""Benchmark workloads: lists of (input length, output length[, arrival time]) requests.

Three kinds, all named by ``load_workload``:

- ``IN/OUT``: constant lengths (the paper's 512/512, 1024/512, 512/1024).
- ``splitwise``, ``lmsys``, ``sharegpt``: seeded samples shaped like the traces the NanoFlow paper
  evaluates on, so throughput can be compared without shipping (or downloading) the traces.
- a CSV/JSON trace file, for the real thing.

Dataset shapes. Mean and standard deviation of input/output lengths in tokens of the sampled
datasets, as published in the NanoFlow paper (Zhu et al., "NanoFlow: Towards Optimal Large Language
Model Serving Throughput", OSDI 2025 / arXiv:2408.12757v2, Table 4 "mean (std)"):

=================  ============  ============
dataset            input         output
=================  ============  ============
Splitwise (conv.)  1155 (1109)   211 (163)
LMSYS-Chat-1M       102 (169)    222 (210)
ShareGPT            246 (547)    322 (244)
=================  ============  ============

The underlying traces: Splitwise's Azure LLM inference conversation trace (Patel et al., ISCA 2024,
github.com/Azure/AzurePublicDataset, AzureLLMInferenceDataset2023), LMSYS-Chat-1M (Zheng et al.,
ICLR 2024, arXiv:2309.11998) and ShareGPT (huggingface.co/datasets/anon8231489123/
ShareGPT_Vicuna_unfiltered); the NanoFlow repository ships the length traces it used
(github.com/efeslab/Nanoflow, datasets/traces/). Lengths are drawn from log-normal distributions
(real length distributions are right-skewed and positive) whose sigma matches the published
coefficient of variation and whose mu is solved so that the mean *after* clipping to
[1, 4096] input / [1, 2048] output tokens equals the published mean.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import random
from dataclasses import dataclass
from pathlib import Path

from nanoflow.errors import ConfigError

MAX_INPUT_LEN = 4096
MAX_OUTPUT_LEN = 2048


@dataclass(frozen=True)
class WorkloadRequest:
    input_len: int
    output_len: int
    arrival_time: float | None = None


@dataclass(frozen=True)
class LengthStats:
    """Published mean and standard deviation of a length, in tokens."""

    mean: float
    std: float


@dataclass(frozen=True)
class DatasetShape:
    input: LengthStats
    output: LengthStats


DATASETS: dict[str, DatasetShape] = {
    "splitwise": DatasetShape(LengthStats(1155, 1109), LengthStats(211, 163)),
    "lmsys": DatasetShape(LengthStats(102, 169), LengthStats(222, 210)),
    "sharegpt": DatasetShape(LengthStats(246, 547), LengthStats(322, 244)),
}


def constant(input_len: int, output_len: int, num_requests: int) -> list[WorkloadRequest]:
    return [WorkloadRequest(input_len, output_len) for _ in range(num_requests)]


def _phi(x: float) -> float:
    return 0.5 * (1.0 + math.erf(x / math.sqrt(2.0)))


def _clipped_lognormal_mean(mu: float, sigma: float, high: float) -> float:
    """E[min(max(X, 1), high)] for X ~ LogNormal(mu, sigma), in closed form."""
    lo, hi = 0.0, math.log(high)
    body = math.exp(mu + sigma**2 / 2) * (
        _phi((hi - mu - sigma**2) / sigma) - _phi((lo - mu - sigma**2) / sigma)
    )
    return _phi((lo - mu) / sigma) + body + high * (1.0 - _phi((hi - mu) / sigma))


def fit_lognormal(stats: LengthStats, high: int) -> tuple[float, float]:
    """(mu, sigma) whose clipped mean is the published mean; sigma from the published std."""
    if not 1 <= stats.mean < high or stats.std <= 0:
        raise ConfigError(
            f"cannot fit lengths of mean {stats.mean}, std {stats.std} in [1, {high}]"
        )
    sigma = math.sqrt(math.log1p((stats.std / stats.mean) ** 2))
    lo, hi = math.log(stats.mean) - 3 * sigma**2 - 5, math.log(high) + 5
    for _ in range(100):
        mid = (lo + hi) / 2
        if _clipped_lognormal_mean(mid, sigma, high) < stats.mean:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2, sigma


def sample_dataset(name: str, num_requests: int, seed: int = 0) -> list[WorkloadRequest]:
    """``num_requests`` independent (input, output) lengths shaped like dataset ``name``."""
    shape = DATASETS[name]
    in_mu, in_sigma = fit_lognormal(shape.input, MAX_INPUT_LEN)
    out_mu, out_sigma = fit_lognormal(shape.output, MAX_OUTPUT_LEN)
    rng = random.Random(f"{name}:{seed}")

    def draw(mu: float, sigma: float, high: int) -> int:
        return min(high, max(1, round(rng.lognormvariate(mu, sigma))))

    return [
        WorkloadRequest(
            draw(in_mu, in_sigma, MAX_INPUT_LEN), draw(out_mu, out_sigma, MAX_OUTPUT_LEN)
        )
        for _ in range(num_requests)
    ]


def with_poisson_arrivals(
    requests: list[WorkloadRequest], rate: float, seed: int = 0
) -> list[WorkloadRequest]:
    """The same requests arriving as a Poisson process of ``rate`` requests/s (first at t=0), the
    arrival model of the paper's online-latency experiments; ``rate=inf`` sends all at once."""
    if not rate > 0:
        raise ConfigError(f"request rate must be positive (or inf), got {rate}")
    rng = random.Random(seed)
    out, t = [], 0.0
    for r in requests:
        out.append(dataclasses.replace(r, arrival_time=t))
        if math.isfinite(rate):
            t += rng.expovariate(rate)
    return out


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
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ConfigError(
            f"cannot read trace {path}: {exc!r} (want input_len,output_len[,arrival_time])"
        ) from None
    if any(r.input_len < 1 or r.output_len < 1 for r in out):
        raise ConfigError(f"trace {path} has a request with a non-positive length")
    return out[:num_requests] if num_requests else out


def load_workload(name: str, num_requests: int, seed: int = 0) -> list[WorkloadRequest]:
    """``IN/OUT`` (constant lengths), a dataset name (``DATASETS``) or a trace file."""
    if "/" in name and all(part.isdigit() for part in name.split("/")):
        input_len, output_len = (int(x) for x in name.split("/"))
        return constant(input_len, output_len, num_requests)
    if name.lower() in DATASETS:
        return sample_dataset(name.lower(), num_requests, seed)
    if Path(name).is_file():
        return from_trace(name, num_requests)
    raise ConfigError(
        f"unknown workload {name!r}: give IN/OUT lengths (e.g. 512/512), one of "
        f"{', '.join(DATASETS)}, or a trace file"
    )


def random_prompts(
    requests: list[WorkloadRequest], vocab_size: int, seed: int = 0
) -> list[list[int]]:
    """Random token ids of each request's input length (throughput does not depend on values)."""
    rng = random.Random(seed)
    high = max(2, vocab_size - 1)
    return [[rng.randrange(2, high) for _ in range(r.input_len)] for r in requests]
