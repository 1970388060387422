"""Result files and the README's results table.

Every experiment writes one JSON per measurement through ``write_result``, which stamps what makes
a number quotable (device, versions, command, date). The README's table is generated from those
files only, never typed by hand: ``python experiments/report.py [--write-readme]``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
REQUIRED_KEYS = ("device", "versions", "command", "date")
START, END = "<!-- results:start -->", "<!-- results:end -->"


def output_root() -> Path:
    """$OUT on the device machine (what comes back from a device call), else experiments/."""
    return Path(os.environ["OUT"]) if os.environ.get("OUT") else ROOT / "experiments"


def versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {"python": platform.python_version()}
    for pkg in ("nanoflow", "torch", "triton", "transformers"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = None
    return out


def stamp(record: dict[str, Any], command: str | None = None) -> dict[str, Any]:
    """``record`` with the keys every quoted result needs, filling in only what is missing."""
    out = dict(record)
    out.setdefault("versions", versions())
    argv = ["python", *sys.argv] if sys.argv[0].endswith(".py") else sys.argv
    out.setdefault("command", command if command is not None else " ".join(argv))
    out.setdefault("date", datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"))
    out.setdefault("device", "unknown")
    return out


def write_result(path: Path, record: dict[str, Any], command: str | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(stamp(record, command), indent=2, default=str))
    return path


def load_results(folder: Path) -> list[dict[str, Any]]:
    """Every result JSON in ``folder`` (sorted by name), skipping files without the required keys
    so a stray file cannot put an unsourced number in the README."""
    out = []
    for path in sorted(folder.glob("*.json")):
        try:
            record = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if isinstance(record, dict) and all(k in record for k in REQUIRED_KEYS):
            out.append(record | {"_file": path.name})
    return out


def _fmt(x: float | None, spec: str) -> str:
    return "" if x is None else format(x, spec)


def rows(record: dict[str, Any]) -> list[dict[str, Any]]:
    """Table rows of one result: one per system measured (offline throughput only)."""
    result = record.get("result", {})
    gpu = record.get("gpu") or record["device"]
    base = {"model": record.get("model", ""), "gpu": gpu, "date": record["date"][:10]}
    kind = record.get("experiment")
    if kind == "throughput" and "tokens_per_s" in result:
        return [
            base
            | {
                "workload": result.get("workload", ""),
                "system": "nanoflow "
                + str(record.get("executor") or record.get("args", {}).get("executor", "")),
                "tokens_per_s": result["tokens_per_s"],
                "fraction_of_optimal": result.get("fraction_of_optimal"),
                "file": record["_file"],
            }
        ]
    if kind == "peer_transformers":
        return [
            base
            | {
                "workload": record.get("workload", ""),
                "system": f"transformers {mode}"
                + (f" (B={r['batch_size']})" if "batch_size" in r else ""),
                "tokens_per_s": r["tokens_per_s"],
                "fraction_of_optimal": None,
                "file": record["_file"],
            }
            for mode, r in result.items()
            if isinstance(r, dict) and "tokens_per_s" in r
        ]
    return []


def throughput_table(records: list[dict[str, Any]]) -> str:
    table = [r for record in records for r in rows(record)]
    if not table:
        return "_No results yet: run `python experiments/run.py` on a GPU._"
    lines = [
        "| model | workload | system | tokens/s (in+out) | % of optimal | GPU | date | source |",
        "| --- | --- | --- | ---: | ---: | --- | --- | --- |",
    ]
    for r in table:
        frac = r["fraction_of_optimal"]
        lines.append(
            f"| {r['model']} | {r['workload']} | {r['system']} | {_fmt(r['tokens_per_s'], ',.0f')}"
            f" | {_fmt(None if frac is None else 100 * frac, '.1f')} | {r['gpu']} | {r['date']}"
            f" | `experiments/results/{r['file']}` |"
        )
    return "\n".join(lines)


def latency_table(records: list[dict[str, Any]]) -> str:
    lines = []
    for record in records:
        if record.get("experiment") != "online_latency":
            continue
        res = record.get("result", {})
        best = res.get("max_rate_under_slo")
        lines.append(
            f"- {record.get('model', '')} on {record.get('workload', '')} "
            f"({record.get('gpu') or record['device']}): highest request rate with normalized "
            f"latency ≤ {res.get('slo_s_per_token')} s/token: "
            f"{'none measured' if best is None else f'{best:g} req/s'} "
            f"(`experiments/results/{record['_file']}`)"
        )
    return "\n".join(lines)


def render(folder: Path) -> str:
    records = load_results(folder)
    parts = [throughput_table(records)]
    latency = latency_table(records)
    if latency:
        parts.append("Online latency:\n\n" + latency)
    return "\n\n".join(parts)


def write_readme(readme: Path, text: str) -> None:
    """Replace what lies between the results markers, leaving the rest of the README as is."""
    content = readme.read_text()
    if START not in content or END not in content:
        raise SystemExit(f"{readme} has no {START} ... {END} markers")
    head, rest = content.split(START, 1)
    tail = rest.split(END, 1)[1]
    readme.write_text(f"{head}{START}\n{text}\n{END}{tail}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", type=Path, default=ROOT / "experiments" / "results")
    parser.add_argument("--readme", type=Path, default=ROOT / "README.md")
    parser.add_argument("--write-readme", action="store_true", help="update the README's table")
    args = parser.parse_args(argv)
    text = render(args.results)
    print(text)
    if args.write_readme:
        write_readme(args.readme, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
