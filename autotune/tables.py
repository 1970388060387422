"""Op tables: how long each op of a decoder layer takes at a grid of sizes and SM budgets, and
how much co-running ops of two resource classes slow each other down.

They are data (JSON), so the search can be rerun, and tested, without a GPU; the profiler is the
only code that needs one to make them.
"""

from __future__ import annotations

import bisect
import functools
import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from nanoflow.errors import ProfileError
from nanoflow.runtime.graph import LayerGraph, OpSpec, Resource, Rows

TABLES_SCHEMA_VERSION = 1


@dataclass(frozen=True)
class OpTable:
    """Seconds of the op ``spec``, ``seconds[i][j][k]`` at ``tokens[i]`` rows, ``contexts[j]``
    tokens of context (attention only; ``[0]`` otherwise) and ``sms[k]`` SMs. The size counts
    the rows ``spec.rows`` names: an op with none of its rows in a nano-batch takes no time
    there."""

    spec: OpSpec
    tokens: tuple[int, ...]
    contexts: tuple[int, ...]
    sms: tuple[int, ...]
    seconds: tuple[tuple[tuple[float, ...], ...], ...]

    @property
    def name(self) -> str:
        return self.spec.name

    def __post_init__(self) -> None:
        for axis in ("tokens", "contexts", "sms"):
            grid = getattr(self, axis)
            if not grid or list(grid) != sorted(set(grid)):
                raise ValueError(f"op {self.name}: {axis} must be a non-empty increasing grid")
        shape = (len(self.tokens), len(self.contexts), len(self.sms))
        got = (
            len(self.seconds),
            len(self.seconds[0]) if self.seconds else 0,
            len(self.seconds[0][0]) if self.seconds and self.seconds[0] else 0,
        )
        if got != shape or any(
            len(plane) != shape[1] or any(len(line) != shape[2] for line in plane)
            for plane in self.seconds
        ):
            raise ValueError(f"op {self.name}: seconds must have shape {shape}")

    def to_dict(self) -> dict[str, Any]:
        """The spec's fields beside the grid, so a table file reads as one flat record per op."""
        spec = asdict(self.spec)
        spec["resource"], spec["rows"] = self.spec.resource.value, self.spec.rows.value
        return spec | {k: getattr(self, k) for k in ("tokens", "contexts", "sms", "seconds")}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> OpTable:
        rows = Rows(d.get("rows", "all"))
        spec = OpSpec(
            name=d["name"],
            resource=Resource(d["resource"]),
            rows=rows,
            after=None if d.get("after") is None else tuple(d["after"]),
            writes_kv=bool(d.get("writes_kv", False)),
            reads_other_kv=bool(d.get("reads_other_kv", False)),
            # tables made before the flag was recorded: the decode op ended the head
            ends_head=bool(d.get("ends_head", rows is Rows.DECODE)),
        )
        seconds = tuple(tuple(tuple(float(s) for s in line) for line in p) for p in d["seconds"])
        return cls(
            spec=spec,
            tokens=tuple(int(x) for x in d["tokens"]),
            contexts=tuple(int(x) for x in d["contexts"]),
            sms=tuple(int(x) for x in d["sms"]),
            seconds=seconds,
        )

    def time(self, tokens: float, context: float, sms: int) -> float:
        """Interpolated seconds. Beyond the grid, work grows in proportion to tokens and context
        and time in inverse proportion to SMs below the smallest budget; a kernel never gets
        faster than at the smallest size measured (launch latency)."""
        if tokens <= 0:
            return 0.0
        total = 0.0
        for i, wi in _weights(self.tokens, tokens, scale_above=True, inverse_below=False):
            for j, wj in _weights(self.contexts, context, scale_above=True, inverse_below=False):
                for k, wk in _weights(self.sms, sms, scale_above=False, inverse_below=True):
                    total += wi * wj * wk * self.seconds[i][j][k]
        return total


def _weights(
    grid: tuple[int, ...], x: float, scale_above: bool, inverse_below: bool
) -> list[tuple[int, float]]:
    if x <= grid[0]:
        return [(0, grid[0] / x if inverse_below and x > 0 else 1.0)]
    if x >= grid[-1]:
        return [(len(grid) - 1, x / grid[-1] if scale_above else 1.0)]
    i = bisect.bisect_right(grid, x) - 1
    w = (x - grid[i]) / (grid[i + 1] - grid[i])
    return [(i, 1.0 - w), (i + 1, w)]


# interference key of the shared-SM layout: one unit keeps the whole GPU, a CTA-limited one
# runs beside it on the same SMs
SHARED_SMS = "cta_limit_shared"


@dataclass(frozen=True)
class OpTables:
    """Everything the cost model knows about one model on one GPU.

    ``ops`` are a layer's ops in model order; ``lm_head`` is timed by sampled rows on the whole
    GPU; ``interference[mechanism]["compute+memory"]`` is how much slower two ops of those classes
    run while they overlap than alone on their units (under ``SHARED_SMS``: a whole-GPU unit
    beside a CTA-limited one, sharing SMs rather than splitting them); ``launch_seconds`` is the
    host time to launch one op, which bounds how finely an iteration may be cut.
    """

    model: str
    architecture_hash: str
    gpu: str | None
    sm_count: int
    gpu_memory_bytes: int
    num_layers: int
    dtype_bytes: int
    ops: tuple[OpTable, ...]
    lm_head: OpTable
    interference: dict[str, dict[str, float]] = field(default_factory=dict)
    launch_seconds: float = 0.0
    date: str = ""
    schema_version: int = TABLES_SCHEMA_VERSION
    kv_dtype_bytes: int | None = None  # the KV cache's element size; None: the model's

    @property
    def kv_element_bytes(self) -> int:
        return self.kv_dtype_bytes or self.dtype_bytes

    @property
    def mechanisms(self) -> tuple[str, ...]:
        """Partitioning mechanisms measured on the GPU (the search tries each)."""
        return tuple(m for m in self.interference if m != SHARED_SMS)

    @property
    def shares_sms(self) -> bool:
        """Whether the shared-SM layout's interference was measured (the search then tries it)."""
        return SHARED_SMS in self.interference

    def factor(self, mechanism: str, a: str, b: str) -> float:
        """Slowdown of an op of class ``a`` while one of class ``b`` runs on another unit."""
        pairs = self.interference.get(mechanism, {})
        return pairs.get("+".join(sorted((a, b))), 1.0)

    @functools.cached_property
    def graph(self) -> LayerGraph:
        """The layer graph the tables were measured on (what the cost model schedules)."""
        return LayerGraph(tuple(op.spec for op in self.ops))

    def to_dict(self) -> dict[str, Any]:
        data = {f.name: getattr(self, f.name) for f in fields(self)}
        return data | {"ops": [op.to_dict() for op in self.ops], "lm_head": self.lm_head.to_dict()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> OpTables:
        return cls(
            model=data["model"],
            architecture_hash=data["architecture_hash"],
            gpu=data.get("gpu"),
            sm_count=int(data["sm_count"]),
            gpu_memory_bytes=int(data["gpu_memory_bytes"]),
            num_layers=int(data["num_layers"]),
            dtype_bytes=int(data.get("dtype_bytes", 2)),
            ops=tuple(OpTable.from_dict(d) for d in data["ops"]),
            lm_head=OpTable.from_dict(data["lm_head"]),
            interference={
                m: {k: float(v) for k, v in pairs.items()}
                for m, pairs in data.get("interference", {}).items()
            },
            launch_seconds=float(data.get("launch_seconds", 0.0)),
            date=data.get("date", ""),
            schema_version=int(data.get("schema_version", TABLES_SCHEMA_VERSION)),
            kv_dtype_bytes=int(data["kv_dtype_bytes"]) if data.get("kv_dtype_bytes") else None,
        )


def save_tables(
    tables: OpTables, path: str | Path, provenance: dict[str, Any] | None = None
) -> None:
    """``provenance`` (device, versions, command...) is stored beside the tables, which keep
    their own keys, date included."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps({**(provenance or {}), **tables.to_dict()}, indent=1))


def load_tables(path: str | Path) -> OpTables:
    """Tables from JSON; a ProfileError says what is wrong with a bad file."""
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise ProfileError(f"op tables {path} do not exist; make them with --tables-out") from None
    except (OSError, json.JSONDecodeError) as exc:
        raise ProfileError(f"op tables {path} are not readable JSON: {exc}") from None
    if data.get("schema_version") != TABLES_SCHEMA_VERSION:
        raise ProfileError(
            f"op tables {path} have schema version {data.get('schema_version')}, this nanoflow "
            f"reads {TABLES_SCHEMA_VERSION}; profile again"
        )
    try:
        return OpTables.from_dict(data)
    except (KeyError, TypeError, ValueError, IndexError) as exc:
        raise ProfileError(f"op tables {path} are malformed: {exc!r}") from None
