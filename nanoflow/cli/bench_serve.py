"""``nanoflow bench serve``: online serving benchmark against a running server, like
``vllm bench serve``: random token-id prompts streamed from /v1/completions at a Poisson rate (or
all at once), reporting request and token throughput and TTFT / TPOT / ITL / latency, and with
``--goodput ttft:MS tpot:MS`` the rate of requests that met every latency SLO (DeepSpeed-FastGen's
effective throughput, in vLLM's spelling)."""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import random
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

_REQUEST_TIMEOUT_S = 3600
GOODPUT_METRICS = ("ttft", "tpot", "e2el")


def parse_goodput(items: list[str]) -> dict[str, float]:
    """``["ttft:500", "tpot:50"]`` -> SLOs in milliseconds by metric."""
    from nanoflow.errors import ConfigError

    slos = {}
    for item in items:
        name, _, value = item.partition(":")
        try:
            ms = float(value)
        except ValueError:
            ms = -1.0
        if name not in GOODPUT_METRICS or ms <= 0:
            raise ConfigError(
                f"--goodput takes METRIC:MS with METRIC one of {', '.join(GOODPUT_METRICS)} and "
                f"MS a positive number, not {item!r}"
            )
        slos[name] = ms
    return slos


def register(kinds: argparse._SubParsersAction) -> None:
    p = kinds.add_parser("serve", help="online serving benchmark against `nanoflow serve`")
    p.add_argument("--base-url", default="http://127.0.0.1:8000", help="the server to drive")
    p.add_argument("--model", default=None, help="model name to send (default: the server's)")
    p.add_argument("--api-key", default=None, help="the server's API key, if it has one")
    p.add_argument("--workload", default="512/512", help="IN/OUT lengths or a trace file")
    p.add_argument("--num-prompts", type=int, default=1000, help="requests in the run")
    p.add_argument("--request-rate", default="inf", help="requests/s (Poisson) or 'inf'")
    p.add_argument(
        "--max-concurrency",
        type=int,
        default=None,
        help="most requests in flight (default: no limit)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the prompts and arrival times")
    p.add_argument("--output-json", default=None, help="also write the result to this JSON file")
    p.add_argument(
        "--goodput",
        nargs="+",
        default=None,
        metavar="METRIC:MS",
        help="latency SLOs (ttft, tpot, e2el in ms) a request must all meet to count toward the "
        "reported request_goodput, e.g. --goodput ttft:500 tpot:50",
    )
    p.add_argument(
        "--save-detailed",
        action="store_true",
        help="also write each request's lengths, TTFT and latency to the JSON",
    )
    p.set_defaults(func=run)


@dataclass
class RequestResult:
    ok: bool = False
    prompt_len: int = 0
    output_tokens: int = 0
    ttft: float = 0.0
    latency: float = 0.0
    itl: list[float] = field(default_factory=list)
    error: str = ""


async def _stream_one(
    session: Any, url: str, body: dict, headers: dict, prompt_len: int
) -> RequestResult:
    import aiohttp

    result = RequestResult(prompt_len=prompt_len)
    started = time.perf_counter()
    last = started
    try:
        async with session.post(url, json=body, headers=headers) as resp:
            if resp.status != 200:
                result.error = f"HTTP {resp.status}: {(await resp.text())[:200]}"
                return result
            async for raw in resp.content:
                line = raw.decode().strip()
                if not line.startswith("data:") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[5:])
                if "error" in chunk:
                    result.error = chunk["error"].get("message", "error")
                    return result
                now = time.perf_counter()
                if chunk.get("choices"):
                    if result.ttft == 0.0:
                        result.ttft = now - started
                    else:
                        result.itl.append(now - last)
                    last = now
                if chunk.get("usage"):
                    result.output_tokens = chunk["usage"]["completion_tokens"]
            result.latency = time.perf_counter() - started
            result.ok = result.ttft > 0
    except (aiohttp.ClientError, TimeoutError, json.JSONDecodeError) as exc:
        result.error = f"{type(exc).__name__}: {exc}"
    return result


def _arrival_gaps(n: int, rate: float, seed: int, trace: list[float | None]) -> list[float]:
    if trace and all(t is not None for t in trace):
        times = sorted(trace)
        return [0.0] + [b - a for a, b in zip(times, times[1:], strict=False)]
    if rate == float("inf"):
        return [0.0] * n
    rng = random.Random(seed)
    return [rng.expovariate(rate) for _ in range(n)]


async def _benchmark(args: argparse.Namespace) -> dict[str, Any]:
    import aiohttp

    from nanoflow.workloads import load_workload, random_prompts

    base = args.base_url.rstrip("/")
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    timeout = aiohttp.ClientTimeout(total=_REQUEST_TIMEOUT_S)
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:
        async with session.get(f"{base}/v1/models", headers=headers) as resp:
            card = (await resp.json())["data"][0]
        model = args.model or card["id"]
        requests = load_workload(args.workload, args.num_prompts, args.seed)
        prompts = random_prompts(requests, card["vocab_size"], args.seed)
        url = f"{base}/v1/completions"

        def body(prompt: list[int], output_len: int) -> dict:
            return {
                "model": model,
                "prompt": prompt,
                "max_tokens": output_len,
                "ignore_eos": True,
                "temperature": 0.0,
                "stream": True,
                "stream_options": {"include_usage": True},
            }

        warm = await _stream_one(session, url, body(prompts[0][:16], 4), headers, 16)
        if not warm.ok:
            raise RuntimeError(f"warm-up request failed: {warm.error}")
        limit = asyncio.Semaphore(args.max_concurrency or len(prompts))

        async def one(prompt: list[int], output_len: int) -> RequestResult:
            async with limit:
                return await _stream_one(
                    session, url, body(prompt, output_len), headers, len(prompt)
                )

        rate = float(args.request_rate)
        gaps = _arrival_gaps(len(prompts), rate, args.seed, [r.arrival_time for r in requests])
        started = time.perf_counter()
        tasks = []
        for prompt, request, gap in zip(prompts, requests, gaps, strict=True):
            if gap > 0:
                await asyncio.sleep(gap)
            tasks.append(asyncio.create_task(one(prompt, request.output_len)))
        results = await asyncio.gather(*tasks)
        duration = time.perf_counter() - started
    return _summarize(results, duration, args.save_detailed, parse_goodput(args.goodput or []))


def _stats_ms(values: list[float], name: str) -> dict[str, float]:
    if not values:
        return {f"mean_{name}_ms": 0.0, f"median_{name}_ms": 0.0, f"p99_{name}_ms": 0.0}
    ordered = sorted(values)
    p99 = ordered[min(len(ordered) - 1, int(round(0.99 * (len(ordered) - 1))))]
    return {
        f"mean_{name}_ms": 1e3 * statistics.fmean(values),
        f"median_{name}_ms": 1e3 * statistics.median(values),
        f"p99_{name}_ms": 1e3 * p99,
    }


def _tpot(r: RequestResult) -> float:
    return (r.latency - r.ttft) / (r.output_tokens - 1) if r.output_tokens > 1 else 0.0


def meets_slos(r: RequestResult, slos: dict[str, float]) -> bool:
    seconds = {"ttft": r.ttft, "tpot": _tpot(r), "e2el": r.latency}
    return r.ok and all(1e3 * seconds[name] <= ms for name, ms in slos.items())


def _summarize(
    results: list[RequestResult],
    duration: float,
    detailed: bool = False,
    goodput: dict[str, float] | None = None,
) -> dict[str, Any]:
    """vllm-style summary; ``detailed`` adds every request, for metrics that are means of
    per-request ratios (NanoFlow's normalized latency); ``goodput`` (SLOs in ms) adds the rate
    of requests that met them all."""
    done = [r for r in results if r.ok]
    input_tokens = sum(r.prompt_len for r in done)
    output_tokens = sum(r.output_tokens for r in done)
    tpots = [_tpot(r) for r in done if r.output_tokens > 1]
    summary: dict[str, Any] = {
        "completed": len(done),
        "failed": len(results) - len(done),
        "errors": sorted({r.error for r in results if not r.ok})[:5],
        "duration_s": duration,
        "total_input_tokens": input_tokens,
        "total_output_tokens": output_tokens,
        "request_throughput": len(done) / duration,
        "output_throughput": output_tokens / duration,
        "total_token_throughput": (input_tokens + output_tokens) / duration,
    }
    summary.update(_stats_ms([r.ttft for r in done], "ttft"))
    summary.update(_stats_ms(tpots, "tpot"))
    summary.update(_stats_ms([gap for r in done for gap in r.itl], "itl"))
    summary.update(_stats_ms([r.latency for r in done], "e2el"))
    if goodput:
        good = sum(meets_slos(r, goodput) for r in results)
        summary["goodput_slos_ms"] = dict(goodput)
        summary["request_goodput"] = good / duration
        summary["goodput_fraction"] = good / len(results) if results else 0.0
    if detailed:
        summary["requests"] = [
            {
                "ok": r.ok,
                "prompt_len": r.prompt_len,
                "output_tokens": r.output_tokens,
                "ttft_s": r.ttft,
                "latency_s": r.latency,
                "error": r.error,
            }
            for r in results
        ]
    return summary


def _print(summary: dict[str, Any]) -> None:
    print(f"{' Serving Benchmark Result ':=^60}")
    rows = [
        ("Successful requests", summary["completed"]),
        ("Failed requests", summary["failed"]),
        ("Benchmark duration (s)", f"{summary['duration_s']:.2f}"),
        ("Total input tokens", summary["total_input_tokens"]),
        ("Total generated tokens", summary["total_output_tokens"]),
        ("Request throughput (req/s)", f"{summary['request_throughput']:.2f}"),
    ]
    if "request_goodput" in summary:
        rows.append(("Request goodput (req/s)", f"{summary['request_goodput']:.2f}"))
    rows += [
        ("Output token throughput (tok/s)", f"{summary['output_throughput']:.2f}"),
        ("Total token throughput (tok/s)", f"{summary['total_token_throughput']:.2f}"),
    ]
    for name in ("ttft", "tpot", "itl", "e2el"):
        for stat in ("mean", "median", "p99"):
            rows.append(
                (f"{stat.capitalize()} {name.upper()} (ms)", f"{summary[f'{stat}_{name}_ms']:.2f}")
            )
    for label, value in rows:
        print(f"{label:<45}{value:>15}")
    for error in summary["errors"]:
        print(f"error: {error}", file=sys.stderr)


def run(args: argparse.Namespace) -> int:
    import torch

    from nanoflow.errors import ConfigError
    from nanoflow.measure import environment

    try:
        rate = float(args.request_rate)
    except ValueError:
        raise ConfigError(
            f"--request-rate must be a number or 'inf', not {args.request_rate!r}"
        ) from None
    if rate <= 0 or args.num_prompts < 1:
        raise ConfigError("--request-rate and --num-prompts must be positive")
    parse_goodput(args.goodput or [])
    summary = asyncio.run(_benchmark(args))
    _print(summary)
    record = {
        **environment(torch.device("cpu")),
        "command": " ".join(sys.argv),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "args": {k: v for k, v in vars(args).items() if k not in ("func", "api_key")},
        "result": summary,
    }
    if args.output_json:
        Path(args.output_json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output_json).write_text(json.dumps(record, indent=2, default=str))
    return 0 if summary["failed"] == 0 else 1
