"""The results tables, generated from the result files only, never typed by hand.

``python experiments/report.py --write`` rewrites ``docs/results.md`` (every table) and the
README's headline table (between its ``results`` markers) from ``experiments/results``.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

from common import RESULTS, ROOT, gpu_of, load_results

from nanoflow.runtime.graph import DECODE_ATTENTION

START, END = "<!-- results:start -->", "<!-- results:end -->"
RESULTS_DOC = ROOT / "docs" / "results.md"


def _gpu(record: dict[str, Any]) -> str:
    """The GPU a result ran on, or its device where it names none."""
    return gpu_of(record) or record["device"]


def _fmt(x: float | None, spec: str) -> str:
    return "" if x is None else format(x, spec)


def rows(record: dict[str, Any]) -> list[dict[str, Any]]:
    """Table rows of one result: one per system measured (offline throughput only)."""
    result = record.get("result", {})
    gpu = _gpu(record)
    base = {"model": record.get("model", ""), "gpu": gpu, "date": record["date"][:10]}
    kind = record.get("experiment")
    if kind == "throughput" and "tokens_per_s" in result:
        return [
            base
            | {
                "workload": result.get("workload", ""),
                "system": f"nanoflow {_executor_label(record)}",
                "num_prompts": result.get("num_prompts"),
                "tokens_per_s": result["tokens_per_s"],
                "fraction_of_optimal": result.get("fraction_of_optimal"),
                "fraction_of_roofline": result.get("fraction_of_roofline"),
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
                "num_prompts": r.get("num_prompts", record.get("num_prompts")),
                "tokens_per_s": r["tokens_per_s"],
                "fraction_of_optimal": None,
                "fraction_of_roofline": None,
                "file": record["_file"],
            }
            for mode, r in result.items()
            if isinstance(r, dict) and "tokens_per_s" in r
        ]
    return []


def _executor_label(record: dict[str, Any]) -> str:
    """The executor, marked ``-graphs`` when the run replayed CUDA graphs (older records carry
    the mark in their label, later ones in the graph statistics of their result)."""
    label = str(record.get("executor") or record.get("args", {}).get("executor", ""))
    graphs = record.get("result", {}).get("cuda_graphs", {}).get("graph_steps", 0)
    return f"{label}-graphs" if graphs and "graphs" not in label.split("-") else label


def _fixed_iteration(record: dict[str, Any]) -> str:
    """The fixed iteration a pipeline run timed, from the options of its command."""
    command = str(record.get("command", ""))

    def option(name: str, default: int) -> int:
        found = re.search(rf"--{name}[ =](\d+)", command)
        return int(found.group(1)) if found else default

    decodes = option("budget", 2048) // 4
    chunks, context = option("prefill-chunks", 3), option("context", 1024)
    prompts = f" and {chunks} prompt chunks of {decodes} tokens" if chunks else ", no prompt tokens"
    cache = ", fp8 KV cache" if re.search(r"--kv-cache-dtype[ =]fp8", command) else ""
    return f"{decodes} decodes at context {context}{prompts}{cache}"


HEADLINE_MODEL, HEADLINE_WORKLOAD = "llama-3-8b", "512/512"


def _best_overlap(record: dict[str, Any]) -> tuple[float, str] | None:
    """(sequential GPU ms / the fastest overlapped schedule's, its name) of one pipeline run."""
    e2e = record.get("e2e")
    schedules = e2e.get("schedules", {}) if isinstance(e2e, dict) else {}
    timed = {}
    for name, row in schedules.items():
        if "gpu_ms" in row.get("iteration", {}):
            timed[name] = row["iteration"]["gpu_ms"]
    overlapped = {n: ms for n, ms in timed.items() if n.startswith(("overlap", "hand-written"))}
    if "sequential" not in timed or not overlapped:
        return None
    name = min(overlapped, key=overlapped.__getitem__)
    return timed["sequential"] / overlapped[name], name


def headline_table(records: list[dict[str, Any]]) -> str:
    """Per GPU, the three headline figures for llama-3-8b: the best 512/512 offline run and its
    share of optimal, that against the best transformers peer run, and the best overlapped
    iteration against the sequential one timed in the same pipeline run."""
    by_gpu: dict[str, dict[str, Any]] = defaultdict(dict)
    for record in records:
        if record.get("model", HEADLINE_MODEL) != HEADLINE_MODEL:  # pipeline runs: llama-3-8b
            continue
        gpu = _gpu(record)
        for row in rows(record):
            if row["workload"] != HEADLINE_WORKLOAD:
                continue
            kind = "ours" if row["system"].startswith("nanoflow") else "peer"
            if row["tokens_per_s"] > by_gpu[gpu].get(kind, {}).get("tokens_per_s", 0):
                by_gpu[gpu][kind] = row
        overlap = _best_overlap(record) if record.get("experiment") == "pipeline" else None
        if overlap and overlap[0] > by_gpu[gpu].get("overlap", (0.0,))[0]:
            by_gpu[gpu]["overlap"] = (*overlap, record["_file"])
    lines = []
    for gpu, best in sorted(by_gpu.items()):
        ours, peer, overlap = best.get("ours"), best.get("peer"), best.get("overlap")
        if ours is None:
            continue
        frac = ours["fraction_of_optimal"]
        cells = [
            gpu,
            f"{ours['tokens_per_s']:,.0f}" + ("" if frac is None else f" ({100 * frac:.1f}%)"),
            f"{peer['tokens_per_s']:,.0f}" if peer else "",
            f"{ours['tokens_per_s'] / peer['tokens_per_s']:.1f}x" if peer else "",
            f"{overlap[0]:.2f}x ({overlap[1]})" if overlap else "",
            ", ".join(
                f"`{f}`" for f in (ours["file"], peer and peer["file"], overlap and overlap[2]) if f
            ),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    if not lines:
        return ""
    return "\n".join(
        [
            f"Headline, {HEADLINE_MODEL} {HEADLINE_WORKLOAD} offline (targets: 60% of optimal, 3x "
            "the transformers peer, an overlapped iteration 1.3x faster than sequential). Each "
            "figure is the best run of its kind on that GPU; ours and the peer's come from "
            "separate runs, the two iterations of the last column from one run.",
            "",
            "| GPU | nanoflow tokens/s (% of optimal) | transformers tokens/s | nanoflow / "
            "transformers | sequential / best overlapped iteration | sources |",
            "| --- | ---: | ---: | ---: | --- | --- |",
            *lines,
        ]
    )


def throughput_table(records: list[dict[str, Any]]) -> str:
    table = [r for record in records for r in rows(record)]
    if not table:
        return "_No results yet: run `python experiments/run.py` on a GPU._"
    lines = [
        "| model | workload | system | prompts | tokens/s (in+out) | % of optimal "
        "| % of roofline | GPU | date | source |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: | --- | --- | --- |",
    ]

    def percent(fraction: float | None) -> str:
        return _fmt(None if fraction is None else 100 * fraction, ".1f")

    for r in table:
        lines.append(
            f"| {r['model']} | {r['workload']} | {r['system']} | {r['num_prompts'] or ''}"
            f" | {_fmt(r['tokens_per_s'], ',.0f')} | {percent(r['fraction_of_optimal'])}"
            f" | {percent(r['fraction_of_roofline'])} | {r['gpu']} | {r['date']}"
            f" | `experiments/results/{r['file']}` |"
        )
    return "\n".join(lines)


def latency_table(records: list[dict[str, Any]]) -> str:
    """Per server run: every request rate's normalized latency, TTFT p99 and output rate, and the
    highest rate that met the SLO."""
    lines = []
    for record in records:
        if record.get("experiment") != "online_latency":
            continue
        res = record.get("result", {})
        best, slo = res.get("max_rate_under_slo"), res.get("slo_s_per_token")
        rates = [p["request_rate"] for p in res.get("points", [])]
        if best is None:
            verdict = "none measured"
        elif best == max(rates):  # no rate tried missed the SLO: the limit lies higher
            verdict = f"at least {best:g} req/s (every rate tried met it)"
        else:
            verdict = f"{best:g} req/s"
        lines += [
            f"- {record.get('model', '')} on {record.get('workload', '')}, "
            f"{_gpu(record)}, {record['date'][:10]} "
            f"(`experiments/results/{record['_file']}`): highest request rate with normalized "
            f"latency ≤ {slo} s/token, of {min(rates, default=0):g}-{max(rates, default=0):g} "
            f"req/s: {verdict}",
            "",
            "  | req/s | completed / failed | normalized latency (ms/token) | TTFT p99 (s) "
            "| output tokens/s |",
            "  | ---: | ---: | ---: | ---: | ---: |",
        ]
        for point in res.get("points", []):
            normalized = point.get("normalized_latency_s")
            per_token_ms = None if normalized is None else 1e3 * normalized
            lines.append(
                f"  | {point['request_rate']:g} | {point.get('completed')} / "
                f"{point.get('failed')} | {_fmt(per_token_ms, '.1f')}"
                f" | {_fmt(point.get('ttft_p99_s'), '.2f')}"
                f" | {_fmt(point.get('output_tokens_per_s'), ',.0f')} |"
            )
        lines.append("")
    return "\n".join(lines).strip()


def _source(record: dict[str, Any]) -> str:
    """Where a figure comes from: GPU, date and result file."""
    return f"{_gpu(record)}, {record['date'][:10]} (`experiments/results/{record['_file']}`)"


def _parity_line(parity: dict[str, Any], source: dict[str, Any] | None = None) -> str:
    where = "" if source is None else f" on {_source(source)}"
    ties = [d for d in parity.get("divergences_vs_fp32", []) if "fp32_top2_margin" in d]
    tie_note = ""
    if ties:
        margins = ", ".join(
            f"{d['fp32_top2_margin']:.3f} "
            f"(engine logit error {d['engine_max_abs_logit_error']:.3f})"
            for d in ties
        )
        tie_note = (
            f" Where the engine's greedy path leaves fp32's, the fp32 top-2 margin was {margins}."
        )
    return (
        f"bf16 parity with transformers on a tiny random checkpoint{where}: greedy 16 tokens "
        f"identical for {parity['greedy_identical_vs_hf_same_dtype']}/{parity['prompts']} "
        f"prompts vs transformers bf16, {parity['greedy_identical_vs_hf_fp32']}/"
        f"{parity['prompts']} vs fp32; largest logits relative error vs fp32 "
        f"{parity['max_logits_rel_err_vs_fp32']:.1e}.{tie_note}"
    )


def pipeline_table(records: list[dict[str, Any]]) -> str:
    """One row per schedule of a pipeline run: one fixed iteration (GPU time and the host's
    launch time) and offline throughput."""
    lines = []
    for record in records:
        if record.get("experiment") != "pipeline":
            continue
        e2e = record.get("e2e")
        if not isinstance(e2e, dict) or "schedules" not in e2e:
            if "prompts" in record.get("parity", {}):
                lines += [_parity_line(record["parity"], record), ""]
            continue
        lines += [
            f"Pipeline, llama-3-8b, {_source(record)}; fixed iteration: "
            f"{_fixed_iteration(record)}:",
            "",
            "| schedule | iteration GPU ms | host launch ms | same, eager launches: GPU / host ms "
            "| offline tokens/s | % of optimal | greedy tokens as sequential |",
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
        ]
        parity = record.get("parity", {})
        if "prompts" in parity:
            lines[-2:-2] = [_parity_line(parity), ""]
        for name, row in e2e["schedules"].items():
            it, tp = row.get("iteration", {}), row.get("throughput", {})
            eager = row.get("iteration_eager", {})
            frac = row.get("fraction_of_optimal")
            eager_cell = (
                f"{eager['gpu_ms']:.1f} / {eager['cpu_launch_ms']:.1f}" if "gpu_ms" in eager else ""
            )
            lines.append(
                f"| {name} | {_fmt(it.get('gpu_ms'), '.1f')}"
                f" | {_fmt(it.get('cpu_launch_ms'), '.1f')} | {eager_cell}"
                f" | {_fmt(tp.get('tokens_per_s'), ',.0f')}"
                f" | {_fmt(None if frac is None else 100 * frac, '.1f')}"
                f" | {_fmt(row.get('greedy_16_identical_to_sequential'), '.0%')} |"
            )
        lines.append("")
    return "\n".join(lines).strip()


def overlap_table(records: list[dict[str, Any]]) -> str:
    """The overlap microbenchmark: a gate-up GEMM beside decode attention on two units."""
    lines = []
    for record in records:
        rows_ = record.get("overlap") if record.get("experiment") == "pipeline" else None
        if not isinstance(rows_, list):
            continue
        lines += [
            f"Overlap microbenchmark, {_source(record)}: gate-up GEMM "
            "(tokens x 4096 x 28672) beside decode attention (256 sequences x context).",
            "",
            "| tokens / context | mechanism | SMs compute / memory | GEMM / attention alone on "
            "their SMs, ms | together, ms | together / larger alone | together / sum of "
            "full-GPU times | GEMM's span beside attention / beside a copy, ms |",
            "| --- | --- | --- | --- | ---: | ---: | ---: | --- |",
        ]
        for r in rows_:
            if "corun_ms" not in r:
                continue
            sms = r.get("unit_sms", {})
            full = r["gemm_full_ms"] + r["attn_full_ms"]
            larger = max(r["gemm_part_ms"], r["attn_part_ms"])
            beside = (
                f"{r['gemm_beside_attn_ms']:.2f} / {r['gemm_beside_copy_ms']:.2f}"
                if "gemm_beside_copy_ms" in r
                else ""
            )
            lines.append(
                f"| {r['tokens']} / {r['context']} | {r['mechanism']} | "
                f"{sms.get('compute')} / {sms.get('memory')} | {r['gemm_part_ms']:.2f} / "
                f"{r['attn_part_ms']:.2f} | {r['corun_ms']:.2f} | {r['corun_ms'] / larger:.2f} | "
                f"{r['corun_ms'] / full:.2f} | {beside} |"
            )
        lines.append("")
    return "\n".join(lines).strip()


def serve_table(records: list[dict[str, Any]]) -> str:
    """`nanoflow serve` driven by `nanoflow bench serve` at several request rates."""
    lines = []
    for record in records:
        if record.get("experiment") != "serve_bench":
            continue
        lines += [
            f"Online serving, {record.get('model', '')} ({record.get('workload', '')} tokens, "
            f"{record.get('num_prompts')} requests), {_source(record)}:",
            "",
            "| request rate | completed / failed | total tokens/s | TTFT median / p99 ms "
            "| TPOT median / p99 ms |",
            "| --- | --- | ---: | ---: | ---: |",
        ]
        for r in record.get("rates", []):
            if "completed" not in r:
                continue
            lines.append(
                f"| {r['request_rate']} | {r['completed']} / {r['failed']}"
                f" | {r['total_token_throughput']:,.0f}"
                f" | {r['median_ttft_ms']:.0f} / {r['p99_ttft_ms']:.0f}"
                f" | {r['median_tpot_ms']:.1f} / {r['p99_tpot_ms']:.1f} |"
            )
        lines.append("")
    return "\n".join(lines).strip()


def _tile(config: dict[str, Any]) -> str:
    heads = config.get("parallel_heads") or 1
    fed = " fed by TMA" if config.get("tma") else ""
    return (
        f"{heads} KV heads x {config['block_n']} tokens per tile{fed}, {config['num_warps']} warps"
    )


def _decode_lines(record: dict[str, Any]) -> list[str]:
    """Decode attention of one kernels run against the copy rate measured in it (none if the
    run timed no decode attention)."""
    section = record.get(DECODE_ATTENTION, {})  # kernel runs name sections by op
    decode = section.get("rows", [])
    what = "Decode attention, batch 256"
    if not decode:  # an fp8-only run: its default launch's rows
        section = record.get("decode_attention_fp8", {})
        launch = section.get("default_config", {})
        decode = [
            r for r in section.get("rows", []) if all(r.get(k) == v for k, v in launch.items())
        ]
        what = "Decode attention over an fp8 cache"
    if not decode:
        return []
    if section.get("default_config"):
        what += f" (default launch: {_tile(section['default_config'])})"
    lines = [
        f"Kernels, {_kernels_source(record)}. {what}, fraction of copy bandwidth:",
        "",
        "| context | 33 CTAs | 66 CTAs | 99 CTAs | 132 CTAs | full grid |",
        "| ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for ctx in sorted({r["context"] for r in decode}):
        by = {r["num_ctas"]: r["frac_copy_bw"] for r in decode if r["context"] == ctx}
        cells = " | ".join(_fmt(by.get(n), ".2f") for n in (33, 66, 99, 132, None))
        lines.append(f"| {ctx} | {cells} |")
    green = record.get("decode_green_context", {})
    if green.get("rows"):
        best = max(green["rows"], key=lambda r: r["frac_copy_bw"])
        lines += [
            "",
            f"In a green context of {green['sms']} SMs (full grid, context "
            f"{best['context']}), the best of {len(green['rows'])} launch configurations "
            f"({_tile(best)}) reads {best['frac_copy_bw']:.2f} of the copy bandwidth"
            + (
                f"; a plain copy in it moves {green['copy']['frac_copy_bw']:.2f}."
                if "copy" in green
                else "."
            ),
        ]
    return lines


def _memory_bound_lines(record: dict[str, Any]) -> list[str]:
    """The small memory-bound kernels (norm, RoPE, SiLU) of one kernels run."""
    rows_ = record.get("memory_bound") or []
    if not rows_:
        return []
    lines = [
        f"Kernels, {_kernels_source(record)}. Memory-bound kernels, bf16:",
        "",
        "| kernel | tokens | ms | fraction of copy bandwidth | torch eager ms |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for r in rows_:
        lines.append(
            f"| {r['kernel']} | {r['tokens']} | {r['ms']:.4f} | {r['frac_copy_bw']:.2f} | "
            f"{r['torch_eager_ms']:.4f} |"
        )
    return lines


def _kernels_source(record: dict[str, Any]) -> str:
    ceil = record.get("ceilings", {})
    return (
        f"{record['device']}, {record['date'][:10]} "
        f"(`experiments/results/{record['_file']}`; ceilings in the same run: copy "
        f"{_fmt(ceil.get('copy_gbs'), ',.0f')} GB/s, "
        f"GEMM {_fmt(ceil.get('gemm_bf16_tflops'), '.0f')} TFLOP/s)"
    )


def kernel_table(records: list[dict[str, Any]]) -> str:
    """Decode attention against the copy-bandwidth ceiling measured in the same run, and the
    memory-bound kernels where a run timed them on their own."""
    lines = []
    for record in records:
        if record.get("experiment") != "kernels":
            continue
        decode = _decode_lines(record)
        # full runs also hold the small kernels; they are shown for a run that timed only them
        part = decode or _memory_bound_lines(record)
        if part:
            lines += [*part, ""]
    return "\n".join(lines).strip()


def fp8_table(records: list[dict[str, Any]]) -> str:
    """FP8 weights against bf16 weights, each pair from one run, beside that run's GEMM rates."""
    lines = []
    for record in records:
        pair = record.get("throughput") or {}
        if record.get("experiment") != "fp8" or record.get("dry_run") or "runs" not in pair:
            continue
        gemm = record.get("gemm") or {}
        lines += [
            f"FP8 (W8A8) against bf16 weights, llama-3-8b, fp8 KV cache, {_source(record)}; "
            f"GEMMs at {gemm.get('tokens')} tokens: bf16 {_fmt(gemm.get('bf16_tflops'), '.0f')}, "
            f"FP8 {_fmt(gemm.get('fp8_tflops'), '.0f')} TFLOP/s "
            f"({_fmt(gemm.get('layer_gemm_speedup'), '.2f')}x; with the quantizing pass "
            f"{_fmt(gemm.get('layer_linear_speedup'), '.2f')}x):",
            "",
            "| workload | prompts | bf16 weights tokens/s | FP8 weights tokens/s | FP8 / bf16 "
            "| FP8 % of optimal at the FP8 GEMM rate |",
            "| --- | ---: | ---: | ---: | ---: | ---: |",
        ]
        for w in [pair, *(pair.get("other_workloads") or {}).values()]:
            runs = w.get("runs", {})
            if not all("tokens_per_s" in runs.get(k, {}) for k in ("bf16", "fp8")):
                continue
            frac = w.get("fp8_weights_fraction_of_optimal_at_fp8")
            percent = _fmt(None if frac is None else 100 * frac, ".1f")
            lines.append(
                f"| {w['workload']} | {w.get('num_prompts', '')}"
                f" | {runs['bf16']['tokens_per_s']:,.0f} | {runs['fp8']['tokens_per_s']:,.0f}"
                f" | {w['fp8_over_bf16']:.2f}x | {percent}% |"
            )
        lines.append("")
    return "\n".join(lines).strip()


def moe_table(records: list[dict[str, Any]]) -> str:
    """Mixtral's expert GEMMs per path and its offline pair, from one ``moe_bench.py`` run."""
    lines = []
    for record in records:
        kernels = (record.get("kernels") or {}).get("tokens")
        if record.get("experiment") != "moe" or record.get("dry_run") or not kernels:
            continue
        lines += [
            f"Mixtral 8x7B expert GEMMs (TFLOP/s of the active FLOPs; fraction of the dense "
            f"bf16 GEMM rate, {_fmt(record.get('gemm_tflops'), '.0f')} TFLOP/s in the same run), "
            f"{_source(record)}:",
            "",
            "| tokens | fused Triton | grouped bf16 | grouped FP8 |",
            "| ---: | ---: | ---: | ---: |",
        ]
        for tokens, row in kernels.items():
            cells = [
                f"{row[path]['tflops']:.0f} ({_fmt(row[path].get('frac_of_dense_gemm'), '.2f')})"
                for path in ("triton", "grouped", "fp8_grouped")
            ]
            lines.append(f"| {tokens} | " + " | ".join(cells) + " |")
        pair = record.get("throughput") or {}
        runs = pair.get("runs") or {}
        if all("tokens_per_s" in runs.get(k, {}) for k in ("bf16", "fp8")):
            frac = pair.get("bf16_fraction_of_optimal")
            fp8_frac = pair.get("fp8_fraction_of_optimal")
            lines += [
                "",
                f"Offline 512/512, {pair.get('num_prompts')} prompts, fp8 KV cache, sequential "
                f"with CUDA graphs: bf16 weights {runs['bf16']['tokens_per_s']:,.0f} tokens/s "
                f"({_fmt(None if frac is None else 100 * frac, '.1f')}% of optimal), FP8 weights "
                f"{runs['fp8']['tokens_per_s']:,.0f} "
                f"({_fmt(None if fp8_frac is None else 100 * fp8_frac, '.1f')}% of the bf16 "
                "optimal).",
            ]
        lines.append("")
    return "\n".join(lines).strip()


def render(folder: Path) -> str:
    """Every table the results in ``folder`` allow, headline first."""
    records = load_results(folder)
    parts = [p for p in (headline_table(records), throughput_table(records)) if p]
    tables = (pipeline_table, overlap_table, fp8_table, moe_table, serve_table, kernel_table)
    for extra in (table(records) for table in tables):
        if extra:
            parts.append(extra)
    latency = latency_table(records)
    if latency:
        parts.append("Online latency:\n\n" + latency)
    return "\n\n".join(parts)


def results_doc(folder: Path) -> str:
    """docs/results.md: what the columns mean, then every table."""
    return "\n".join(
        [
            "# Results",
            "",
            "Generated by `python experiments/report.py --write` from the result files under "
            "`experiments/results/<gpu>/<experiment>/<label>.json` (each with its device, package "
            'versions, command and date); do not edit by hand. "% of optimal" is NanoFlow\'s '
            'bound: every token at the GEMM rate measured in the same run. "% of roofline" is '
            "the bound of the iterations the run actually made: each at its GEMM FLOPs or its "
            "bytes (weights once, the K/V it reads and writes) at the measured copy rate, "
            "whichever is longer; runs made before it was recorded leave it blank. What the "
            "numbers mean is in [findings.md](findings.md).",
            "",
            render(folder),
            "",
        ]
    )


def write_between_markers(path: Path, text: str) -> None:
    """Replace what lies between the results markers of ``path``, leaving the rest as is."""
    content = path.read_text()
    if START not in content or END not in content:
        raise SystemExit(f"{path} has no {START} ... {END} markers")
    head, rest = content.split(START, 1)
    tail = rest.split(END, 1)[1]
    path.write_text(f"{head}{START}\n{text}\n{END}{tail}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", type=Path, default=RESULTS)
    parser.add_argument("--doc", type=Path, default=RESULTS_DOC, help="the tables' document")
    parser.add_argument("--readme", type=Path, default=ROOT / "README.md")
    parser.add_argument(
        "--write", action="store_true", help="rewrite --doc and the README's headline table"
    )
    args = parser.parse_args(argv)
    if not args.write:
        print(render(args.results))
        return 0
    args.doc.parent.mkdir(parents=True, exist_ok=True)
    args.doc.write_text(results_doc(args.results))
    headline = headline_table(load_results(args.results))
    write_between_markers(args.readme, headline or "_No results yet._")
    print(f"wrote {args.doc} and the headline of {args.readme}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
