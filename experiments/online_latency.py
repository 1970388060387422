"""Online latency against request rate, as in the paper's latency experiment: start
``nanoflow serve MODEL --load-format dummy``, drive it with ``nanoflow bench serve`` at increasing
Poisson request rates on a dataset-shaped workload, and report per rate the normalized latency
(mean over requests of end-to-end latency / output tokens, the metric NanoFlow's README defines)
and TTFT p99, plus the highest rate whose normalized latency meets the SLO (--slo, s/token),
and beside the raw request throughput the goodput: the rate of requests that met every latency
SLO of ``--goodput`` (DeepSpeed-FastGen's effective throughput, in vLLM's spelling, counted by
``nanoflow bench serve --goodput``).

Each rate runs ``nanoflow bench serve --save-detailed``, whose JSON lists every request
(``latency_s``, ``ttft_s``, ``output_tokens``), so the normalized latency is the mean of
per-request ratios, as the paper defines it. A result without that list (runs made before the
option existed) gives the ratio of the summary's means (mean_e2el_ms over mean output tokens);
each point says which it is.

Usage: python experiments/online_latency.py [--model llama-3-8b] [--workload sharegpt]
           [--rates 2,4,8,16,32] [--duration-s 30] [--slo 0.2] [--goodput ttft:MS tpot:MS]
           [--out DIR | --output-json PATH]
           [--kv-cache-dtype fp8] [--max-num-seqs N]                  (server settings)
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch
from common import add_out_argument, nanoflow_exe, result_path, server, slug, write_json

from nanoflow.cli.bench_serve import parse_goodput
from nanoflow.errors import ConfigError
from nanoflow.measure import environment


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (no interpolation: p99 of 100 values is the 99th)."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(len(ordered) * q / 100) - 1)]


def summarize(bench: dict[str, Any], rate: float) -> dict[str, Any]:
    """One point of the curve from a ``bench serve`` result: the mean of per-request ratios when
    the result lists requests, else the ratio of the means its summary gives (labelled so)."""
    result = bench["result"]
    return _point(result, rate) | {
        key: result[key]
        for key in ("request_throughput", "request_goodput", "goodput_fraction")
        if key in result
    }


def _point(result: dict[str, Any], rate: float) -> dict[str, Any]:
    reqs = [r for r in result.get("requests", []) if r.get("ok", True) and r["output_tokens"] > 0]
    if reqs:
        normalized = [r["latency_s"] / r["output_tokens"] for r in reqs]
        return {
            "request_rate": rate,
            "completed": len(reqs),
            "failed": result.get("failed", 0),
            "output_tokens_per_s": result.get("output_throughput"),
            "normalized_latency_s": sum(normalized) / len(normalized),
            "normalized_latency_method": "mean of per-request e2e latency / output tokens",
            "ttft_p99_s": percentile([r["ttft_s"] for r in reqs], 99),
            "mean_latency_s": sum(r["latency_s"] for r in reqs) / len(reqs),
        }
    if not result.get("completed"):
        raise SystemExit(f"bench serve at {rate} req/s completed no request")
    mean_output = result["total_output_tokens"] / result["completed"]
    return {
        "request_rate": rate,
        "completed": result["completed"],
        "failed": result.get("failed", 0),
        "normalized_latency_s": result["mean_e2el_ms"] / 1e3 / mean_output,
        "normalized_latency_method": "mean e2e latency / mean output tokens",
        "ttft_p99_s": result["p99_ttft_ms"] / 1e3,
        "mean_latency_s": result["mean_e2el_ms"] / 1e3,
        "output_tokens_per_s": result.get("output_throughput"),
    }


def max_rate_under_slo(points: list[dict[str, Any]], slo: float) -> float | None:
    """Highest rate before the first rate that misses the SLO (rates ascending)."""
    best = None
    for p in sorted(points, key=lambda p: p["request_rate"]):
        if p["normalized_latency_s"] > slo:
            break
        best = p["request_rate"]
    return best


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="llama-3-8b")
    p.add_argument("--workload", default="sharegpt")
    p.add_argument("--profile", default=None)
    p.add_argument(
        "--kv-cache-dtype", default="auto", choices=["auto", "fp8"], help="the server's KV cache"
    )
    p.add_argument("--max-num-seqs", type=int, default=None, help="the server's sequence limit")
    p.add_argument("--rates", default="2,4,8,16,32", help="request rates, ascending (req/s)")
    p.add_argument("--duration-s", type=float, default=30.0, help="arrivals per rate ≈ rate × this")
    p.add_argument("--min-prompts", type=int, default=20)
    p.add_argument("--slo", type=float, default=0.2, help="normalized latency bound, s/token")
    p.add_argument(
        "--goodput",
        nargs="+",
        default=["ttft:2000", "tpot:100"],
        metavar="METRIC:MS",
        help="latency SLOs (ttft, tpot, e2el in ms) a request must all meet to count toward "
        "the goodput, passed to bench serve",
    )
    p.add_argument("--port", type=int, default=None, help="default: a free port")
    p.add_argument("--startup-timeout-s", type=float, default=300.0)
    add_out_argument(p)
    p.add_argument("--output-json", type=Path, default=None, help="this file instead of --out's")
    args = p.parse_args(argv)
    try:
        args.goodput_slos_ms = parse_goodput(args.goodput)
    except ConfigError as exc:
        p.error(str(exc))
    return args


def serve_args(args: argparse.Namespace) -> list[str]:
    """``nanoflow serve``'s arguments: dummy weights and the engine settings asked for (a
    profile tuned for the fp8 cache needs the server set to it)."""
    serve = [args.model, "--load-format", "dummy", "--kv-cache-dtype", args.kv_cache_dtype]
    if args.profile:
        serve += ["--profile", str(Path(args.profile).resolve())]
    if args.max_num_seqs:
        serve += ["--max-num-seqs", str(args.max_num_seqs)]
    return serve


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    env = environment(device)
    label = f"{args.model}-{slug(args.workload)}"
    path = args.output_json or result_path(args.out, env["gpu"], "online_latency", label)
    work = path.parent / f"{path.stem}_raw"
    work.mkdir(parents=True, exist_ok=True)
    points: list[dict[str, Any]] = []
    with server(serve_args(args), work / "server.log", args.port, args.startup_timeout_s) as live:
        url = live.url
        for rate in (float(r) for r in args.rates.split(",")):
            raw = work / f"rate-{rate:g}.json"
            n = max(args.min_prompts, round(rate * args.duration_s))
            bench = [nanoflow_exe(), "bench", "serve", "--base-url", url, "--workload"]
            bench += [args.workload, "--num-prompts", str(n), "--request-rate", str(rate)]
            # bench serve exits 1 when some requests failed; its JSON says how many
            bench += ["--goodput", *args.goodput, "--save-detailed", "--output-json", str(raw)]
            done = subprocess.run(bench)
            if not raw.is_file():
                raise SystemExit(f"bench serve at {rate:g} req/s wrote no result: {done}")
            points.append(summarize(json.loads(raw.read_text()), rate))
            print(json.dumps(points[-1]))
            if points[-1]["normalized_latency_s"] > args.slo:
                break
        server_command = " ".join(live.command)
    record = {
        **env,
        "experiment": "online_latency",
        "model": args.model,
        "workload": args.workload,
        "server_command": server_command,
        "result": {
            "slo_s_per_token": args.slo,
            "goodput_slos_ms": args.goodput_slos_ms,
            "points": points,
            "max_rate_under_slo": max_rate_under_slo(points, args.slo),
        },
    }
    print(write_json(path, record))
    return 0


if __name__ == "__main__":
    sys.exit(main())
