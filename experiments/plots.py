"""Figures from result JSONs (never from typed numbers): throughput per workload and system with
the share of NanoFlow's optimal bound, the ablation (sequential / nano-batches without overlap /
overlapped), latency against request rate, and pipeline timelines.

Usage: python experiments/plots.py [--results DIR] [--figures DIR] [--gpu NAME]
(``--gpu "NVIDIA H200"`` keeps that GPU's results and names the figures ``*_h200.png``;
timelines are drawn one per timeline result, ``timeline_<label>_<gpu>.png``)
"""

from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from common import FIGURES, RESULTS, gpu_folder, gpu_of, load_results  # noqa: E402
from report import rows  # noqa: E402

ABLATION = {
    "nanoflow sequential": "sequential",
    "nanoflow nanobatch": "nano-batches,\nno overlap",
    "nanoflow overlapped": "overlapped",
    "nanoflow tuned": "tuned profile",
}


def _save(fig: plt.Figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=120, bbox_inches="tight")  # the legend sits outside the axes
    plt.close(fig)
    return path


def _executor(system: str) -> tuple[str, str] | None:
    """(executor, engine setting) of a nanoflow table row of one of ``ABLATION``'s executors:
    ``nanoflow sequential-graphs-fp8kv`` is ("sequential", "graphs-fp8kv"); else None."""
    executor, _, setting = system.removeprefix("nanoflow ").partition("-")
    return (executor, setting) if f"nanoflow {executor}" in ABLATION else None


def _one_line(label: str) -> str:
    return label.replace("\n", " ")


FAMILIES = (*map(_one_line, ABLATION.values()), "transformers")


def _family(system: str) -> str | None:
    """The kind of system a table row measures: a nanoflow executor (or the tuned profile), or
    the transformers peer; runs that differ only in build, prompt count or setting are one."""
    if (found := _executor(system)) is not None:
        return _one_line(ABLATION[f"nanoflow {found[0]}"])
    return "transformers" if system.startswith("transformers") else None


def best_runs(records: list[dict[str, Any]]) -> dict[str, dict[str, dict[str, Any]]]:
    """{group: {family: row}}, the fastest run of each kind of system per group; a group is a
    workload, with the model and the GPU named when the results hold several."""
    table = [
        (family, row)
        for record in records
        for row in rows(record)
        if (family := _family(row["system"])) is not None
    ]
    several_models = len({row["model"] for _, row in table}) > 1
    several_gpus = len({row["gpu"] for _, row in table}) > 1
    best: dict[str, dict[str, dict[str, Any]]] = defaultdict(dict)
    # model by model; constant lengths (IN/OUT) before the dataset shapes
    table.sort(key=lambda t: (t[1]["model"], "/" not in t[1]["workload"], t[1]["workload"]))
    for family, row in table:
        group = row["workload"]
        if several_models:
            group = f"{row['model']}\n{group}"
        if several_gpus:
            group += f"\n{_gpu_short(row['gpu'])}"
        if family not in best[group] or row["tokens_per_s"] > best[group][family]["tokens_per_s"]:
            best[group][family] = row
    return best


def throughput_bars(records: list[dict[str, Any]], path: Path) -> Path | None:
    """One group of bars per workload, one bar per kind of system (its fastest run; the README's
    table lists every run), labelled with % of optimal."""
    best = best_runs(records)
    if not best:
        return None
    width = 0.8 / len(FAMILIES)
    fig, ax = plt.subplots(figsize=(max(6, 1.1 * len(best)), 4))
    for x, runs in enumerate(best.values()):
        present = [f for f in FAMILIES if f in runs]
        start = x + 0.4 - width * len(present) / 2  # the group's bars side by side, centred
        for j, family in enumerate(present):
            row = runs[family]
            colour = f"C{FAMILIES.index(family)}"
            bar = ax.bar(start + (j + 0.5) * width, row["tokens_per_s"], width, color=colour)
            if row["fraction_of_optimal"] is not None:
                ax.bar_label(bar, [f"{100 * row['fraction_of_optimal']:.0f}%"], fontsize=6)
    ax.set_xticks([x + 0.4 for x in range(len(best))], list(best), fontsize=7)
    ax.set_ylabel("tokens/s (input + output)")
    ax.set_title("Offline throughput, the fastest run of each system (labels: % of optimal)")
    shown = [f for f in FAMILIES if any(f in runs for runs in best.values())]
    ax.legend(
        [plt.Rectangle((0, 0), 1, 1, color=f"C{FAMILIES.index(f)}") for f in shown],
        shown,
        fontsize=7,
        loc="upper left",
        bbox_to_anchor=(1.0, 1.0),
    )
    return _save(fig, path)


def _gpu_name(gpu: str) -> str:
    """The GPU's slug without the vendor: ``h100-80gb-hbm3``, ``h200``."""
    return gpu_folder(gpu).removeprefix("nvidia-")


def _gpu_short(gpu: str) -> str:
    """``H100``, ``H200``: the name a figure's group labels carry."""
    return _gpu_name(gpu).split("-")[0].upper()


def _ablation_key(row: dict[str, Any]) -> tuple[str, str] | None:
    """(executor, the group it is compared in) for a nanoflow row, else None. A group is one GPU,
    workload, prompt count and engine setting (launch mode, KV cache, sequence limit): an
    executor is only compared with the sequential executor run under the same ones."""
    if (found := _executor(row["system"])) is None:
        return None
    executor, setting = found
    mode = "CUDA graphs" if setting.startswith("graphs") else "eager"
    setting = setting.removeprefix("graphs").strip("-")
    detail = f"{mode}, {setting}" if setting else mode
    return executor, f"{row['workload']} ({row['num_prompts']})\n{_gpu_short(row['gpu'])}, {detail}"


def ablation_bars(records: list[dict[str, Any]], path: Path) -> Path | None:
    """Throughput of each nanoflow executor (and the tuned profile) relative to the sequential
    executor run under the same GPU, workload, prompt count and engine setting."""
    runs: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for record in records:
        for row in rows(record):
            if (key := _ablation_key(row)) is not None:
                executor, group = key
                runs[group][f"nanoflow {executor}"].append(row["tokens_per_s"])
    # a group with two runs of one executor does not say which pair was measured together
    table = {
        g: {system: tps[0] for system, tps in t.items()}
        for g, t in runs.items()
        if "nanoflow sequential" in t and len(t) > 1 and all(len(v) == 1 for v in t.values())
    }
    if not table:
        return None
    fig, ax = plt.subplots(figsize=(max(5, 1.6 * len(table)), 4))
    width = 0.8 / len(ABLATION)
    for i, (system, label) in enumerate(ABLATION.items()):
        labelled = False
        for x, t in enumerate(table.values()):
            if system in t:
                speedup = t[system] / t["nanoflow sequential"]
                bar = ax.bar(
                    x + i * width, speedup, width, color=f"C{i}", label=None if labelled else label
                )
                labelled = True
                ax.bar_label(bar, [f"{speedup:.2f}×"], fontsize=6)
    ax.axhline(1.0, color="grey", linewidth=0.5)
    ax.margins(y=0.2)
    ax.set_xticks([x + 0.4 - width / 2 for x in range(len(table))], list(table), fontsize=6)
    ax.tick_params(axis="x", labelrotation=30)
    ax.set_ylabel("throughput / sequential")
    ax.set_title("Ablation (groups: workload (prompts), GPU, engine setting)")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    return _save(fig, path)


def latency_curves(records: list[dict[str, Any]], path: Path) -> Path | None:
    """Normalized latency and TTFT p99 against request rate, one line per server run, and where
    the runs measured it the request throughput with the goodput beside it (the rate of requests
    that met every latency SLO)."""
    runs = [r for r in records if r.get("experiment") == "online_latency"]
    if not runs:
        return None
    rated = any("request_throughput" in p for r in runs for p in r["result"]["points"])
    fig, axes = plt.subplots(1, 3 if rated else 2, figsize=(15 if rated else 10, 3.8))
    left, middle = axes[:2]
    for i, record in enumerate(runs):
        points = record["result"]["points"]
        rates = [p["request_rate"] for p in points]
        label = f"{record.get('model', '')} {record.get('workload', '')}, {min(rates):g}-"
        label += f"{max(rates):g} req/s"
        left.plot(rates, [p["normalized_latency_s"] for p in points], marker="o", label=label)
        middle.plot(rates, [p["ttft_p99_s"] for p in points], marker="o", label=label)
        slo = record["result"].get("slo_s_per_token")
        if slo is not None:
            left.axhline(slo, color="grey", linestyle="--", linewidth=0.8)
        if rated:
            _throughput_and_goodput(axes[2], points, record["result"], f"C{i}")
    left.set(xlabel="request rate (req/s)", ylabel="normalized latency (s/token)")
    middle.set(xlabel="request rate (req/s)", ylabel="TTFT p99 (s)")
    left.legend(fontsize=7)
    if rated:  # colours are the runs of the left legend; one entry per kind of line
        axes[2].set(xlabel="request rate (req/s)", ylabel="completed requests/s")
        handles, labels = axes[2].get_legend_handles_labels()
        kinds = dict(zip(labels, handles, strict=True))
        axes[2].legend(kinds.values(), kinds.keys(), fontsize=7)
    return _save(fig, path)


def _throughput_and_goodput(
    ax: plt.Axes, points: list[dict[str, Any]], result: dict[str, Any], colour: str
) -> None:
    """One run's raw request throughput (solid) and goodput (dashed), where its points hold
    them (results of runs before goodput was measured hold neither)."""
    measured = [p for p in points if "request_throughput" in p]
    if not measured:
        return
    rates = [p["request_rate"] for p in measured]
    ax.plot(rates, [p["request_throughput"] for p in measured], marker="o", color=colour,
            label="throughput")  # fmt: skip
    with_goodput = [p for p in measured if "request_goodput" in p]
    if with_goodput:
        slos = result.get("goodput_slos_ms") or {}
        rule = ", ".join(f"{name} ≤ {ms:g} ms" for name, ms in slos.items())
        ax.plot([p["request_rate"] for p in with_goodput],
                [p["request_goodput"] for p in with_goodput], marker="s", linestyle="--",
                color=colour, label=f"goodput ({rule})" if rule else "goodput")  # fmt: skip


def timeline_figure(record: dict[str, Any], label: str, path: Path) -> Path:
    """A timeline result's Gantt chart, titled with its span beside the untimed iteration: the
    span of CUDA events inside the iteration (which perturb it) or of the profiler's trace."""
    from nanoflow.runtime.timeline import TimelineRecord, draw_timeline

    records = [TimelineRecord(**r) for r in record["records"]]
    layers = max(r.layer for r in records) + 1
    title = f"{_gpu(record)}: {label}, layers 0-{layers - 1} of one iteration"
    for span, untimed, what in (
        ("timed_span_ms", "untimed_gpu_ms", "timed span"),
        ("traced_span_ms", "untimed_ms", "traced span"),
    ):
        if record.get(span) is not None and record.get(untimed) is not None:
            title += f"\n{what} {record[span]:.2f} ms, untimed iteration {record[untimed]:.2f} ms"
    draw_timeline(records, path, title)
    return path


def timelines(records: list[dict[str, Any]], figures: Path) -> list[Path]:
    """One Gantt chart per timeline result, per execution unit."""
    made = []
    for record in records:
        if record.get("experiment") != "timeline" or not record.get("records"):
            continue
        label = Path(record["_file"]).stem
        path = figures / f"timeline_{label}_{_gpu_name(_gpu(record))}.png"
        made.append(timeline_figure(record, label, path))
    return made


def _gpu(record: dict[str, Any]) -> str:
    return gpu_of(record) or "cpu"


def make_all(results: Path, figures: Path, gpu: str | None = None) -> list[Path]:
    """Every figure the results allow; with ``gpu``, from that GPU's results alone."""
    records = load_results(results)
    suffix = ""
    if gpu is not None:
        records = [r for r in records if gpu_of(r) == gpu]
        suffix = "_" + _gpu_name(gpu)
    made = [
        throughput_bars(records, figures / f"throughput{suffix}.png"),
        ablation_bars(records, figures / f"ablation{suffix}.png"),
        latency_curves(records, figures / f"latency{suffix}.png"),
    ]
    return [p for p in made if p is not None] + timelines(records, figures)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", type=Path, default=RESULTS)
    parser.add_argument("--figures", type=Path, default=FIGURES)
    parser.add_argument("--gpu", default=None, help="only this GPU's results (its name)")
    args = parser.parse_args(argv)
    for path in make_all(args.results, args.figures, args.gpu):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
