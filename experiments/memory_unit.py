"""The memory unit against what k SMs can stream, in one GPU call.

1. The ceiling: a streaming-read kernel (kernels/cuda/decode_attention.cu) on k CTAs of a plain
   stream (one per SM) and inside green contexts of k SMs (one or two CTAs per SM), the best of
   several shapes at each k.
2. Paged decode attention (bf16 and fp8 e4m3 caches, page 16, 32/8 heads, head_dim 128) over
   batches 64-1024 and contexts 256-8192, at every SM budget, CTA-limited and in green contexts:
   the CUDA kernel and the earlier Triton kernel side by side, each checked against the PyTorch
   reference on random lengths, each as a fraction of the curve at its budget.
3. RMSNorm + residual, RoPE + KV write and SiLU-and-mul at 2048 tokens on the full GPU and in a
   32-SM green context, against the curve there.
4. llama-3-8b 512/512 offline (dummy weights, fp8 cache, 1024 sequences, sequential executor)
   with the Triton decode kernels and with the CUDA one, in the same call.

Writes every row to DIR/<gpu>/memory_unit/llama-3-8b-shapes.json (the two end-to-end runs beside
it) and the targets to DIR/targets/memory-unit.json, DIR defaulting to experiments/results.
Without a GPU it checks the split planning and the Triton kernels under the interpreter and
writes no targets.

Usage: python experiments/memory_unit.py [--out DIR] [--sections read,decode,small,throughput]
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from contextlib import nullcontext
from functools import partial
from pathlib import Path
from typing import Any

import torch

GPU = torch.cuda.is_available()
if not GPU:
    os.environ.setdefault("TRITON_INTERPRET", "1")

from common import add_out_argument, commit, gpu_name, result_path, write_json  # noqa: E402

from nanoflow.kernels import decode_attention_cuda as cuda_kernel  # noqa: E402
from nanoflow.kernels.activation import silu_and_mul_triton  # noqa: E402
from nanoflow.kernels.decode_attention import (  # noqa: E402
    CONFIG_ENV,
    CUDA_PREFIX,
    TRITON_ONLY,
    _cuda_choice,
    force_config,
    forced_config,
    paged_decode_attention_ref,
    paged_decode_attention_triton,
    parse_cuda_config,
)
from nanoflow.kernels.norm import rms_norm_triton  # noqa: E402
from nanoflow.kernels.rotary import rope_kv_write_triton  # noqa: E402
from nanoflow.measure import environment, time_cuda  # noqa: E402

EXPERIMENT = "memory_unit"

DEVICE = torch.device("cuda" if GPU else "cpu")
CTA_BUDGETS = (16, 24, 32, 48, 66, 132)
GREEN_BUDGETS = (16, 24, 32, 48)
DECODE_CASES = ((64, 8192), (256, 2048), (1024, 512), (1024, 256))  # (batch, context)
# as the engine runs it: random lengths up to 1024 in block tables 512 pages wide
MIXED_CASE = (1024, 1024, 512)
HEADS, KV_HEADS, HEAD_DIM, PAGE = 32, 8, 128, 16
# (threads per CTA, loads in flight per thread, CTAs per SM the registers are sized for)
CTA_READ_SHAPES = ((1024, 8, 1), (1024, 4, 1), (512, 16, 1), (512, 8, 1))
GREEN_READ_SHAPES = ((1024, 8, 1), (1024, 4, 2), (512, 8, 2), (512, 4, 3), (256, 8, 4))
READ_BYTES = 2 << 30
TOLERANCE = 2e-2
TARGET_FRACTION = 0.85
RESULTS: dict[str, Any] = {"checks": [], "errors": {}}


def bench_ms(fn: Callable[[], Any]) -> float:
    """Median GPU milliseconds over ~50 ms of runs, L2 flushed, launches queued ahead."""
    once = time_cuda(fn, iters=3, queue_ahead=True)
    iters = max(5, min(60, int(0.05 / max(once, 1e-6))))
    return time_cuda(fn, iters=iters, warmup=2, queue_ahead=True, flush_l2=True) * 1e3


@functools.cache
def green_stream(sms: int) -> Any:
    """A stream confined to a green context of ``sms`` SMs (one split of the device)."""
    from nanoflow.runtime.schedule import Mechanism, PipelineSchedule, UnitSpec
    from nanoflow.runtime.units import build_units

    schedule = PipelineSchedule(
        units=(UnitSpec("memory", sms), UnitSpec("rest")),
        op_units={"memory": "memory", "compute": "rest", "network": "rest"},
        mechanism=Mechanism.GREEN_CONTEXT,
    )
    unit = build_units(schedule, DEVICE)["memory"]
    if unit.num_sms != sms:
        raise RuntimeError(f"asked for a green context of {sms} SMs, got {unit.num_sms}")
    return unit


def check(name: str, out: torch.Tensor, ref: torch.Tensor) -> None:
    err = ((out.float() - ref.float()).norm() / ref.float().norm().clamp_min(1e-12)).item()
    ok = bool(torch.isfinite(out).all()) and err < TOLERANCE
    RESULTS["checks"].append({"name": name, "rel_err": err, "ok": ok})
    if not ok:
        print(f"CHECK FAILED {name}: rel_err {err:.3g}", flush=True)


# ---------------------------------------------------------------- 1. the streaming-read curve
def read_curve() -> dict[str, Any]:
    src = torch.randint(-(2**31), 2**31 - 1, (READ_BYTES // 4,), dtype=torch.int32, device=DEVICE)
    sink = torch.empty(132 * 4 * 1024 * 4, dtype=torch.int32, device=DEVICE)
    rows = []

    def best(sms: int, mechanism: str, shapes: tuple[tuple[int, int, int], ...]) -> float:
        top = 0.0
        for threads, unroll, per_sm in shapes:
            grid = sms * per_sm
            fn = partial(cuda_kernel.stream_read, src, sink, grid, threads, unroll, per_sm)
            gbs = READ_BYTES / bench_ms(fn) / 1e6
            rows.append(dict(mechanism=mechanism, sms=sms, threads=threads, unroll=unroll,
                             ctas_per_sm=per_sm, gbs=gbs))  # fmt: skip
            top = max(top, gbs)
        return top

    cta = {k: best(k, "cta_limited", CTA_READ_SHAPES) for k in CTA_BUDGETS}
    green = {}
    for k in GREEN_BUDGETS:
        with torch.cuda.stream(green_stream(k).stream):
            green[k] = best(k, "green_context", GREEN_READ_SHAPES)
    torch.cuda.synchronize()
    return {"cta_limited": cta, "green_context": green, "rows": rows}


# ---------------------------------------------------------------- 2. decode attention
def paged_cache(
    lens: list[int], dtype: torch.dtype, width: int | None = None
) -> tuple[torch.Tensor, ...]:
    pages = [-(-n // PAGE) for n in lens]
    width = max(max(pages), width or 0)
    total = sum(pages)
    shape = (total, KV_HEADS, PAGE, HEAD_DIM)
    k = torch.randn(shape, device=DEVICE, dtype=torch.bfloat16).to(dtype)
    v = torch.randn(shape, device=DEVICE, dtype=torch.bfloat16).to(dtype)
    perm = torch.randperm(total, device=DEVICE, dtype=torch.int32)
    tables = torch.zeros(len(lens), width, dtype=torch.int32, device=DEVICE)
    start = 0
    for i, n in enumerate(pages):
        tables[i, :n] = perm[start : start + n]
        start += n
    return k, v, tables


def decode_inputs(
    batch: int, ctx: int, kv_dtype: torch.dtype, random_lens: bool, width: int | None = None
) -> tuple:
    gen = torch.Generator().manual_seed(batch * 7 + ctx)
    lens = (
        torch.randint(1, ctx + 1, (batch,), generator=gen).tolist()
        if random_lens
        else [ctx] * batch
    )
    k, v, tables = paged_cache(lens, kv_dtype, width)
    q = torch.randn(batch, HEADS, HEAD_DIM, device=DEVICE, dtype=torch.bfloat16)
    lens_t = torch.tensor(lens, dtype=torch.int32, device=DEVICE)
    kv_bytes = 2 * sum(lens) * KV_HEADS * HEAD_DIM * k.element_size()
    return (q, k, v, tables, lens_t, HEAD_DIM**-0.5), kv_bytes


def run_decode(kernel: str, args: tuple, num_ctas: int | None, out: torch.Tensor) -> torch.Tensor:
    """``kernel``: "cuda" (the default choice), "cuda:..." (a forced CUDA configuration) or
    "triton" (the Triton kernels with their built-in choice), on the current stream."""
    forced = {"cuda": None, "triton": TRITON_ONLY}.get(kernel, kernel)
    if kernel.startswith("cuda") and _cuda_choice(*args[:5]) is None:
        raise RuntimeError("the CUDA decode kernel does not apply here (CuPy, GPU or layout)")
    previous = forced_config()
    force_config(forced)
    try:
        return paged_decode_attention_triton(*args, num_ctas=num_ctas, out=out)
    finally:
        force_config(previous)


def fits(kernel: str, kv_dtype: torch.dtype) -> bool:
    """A forced CUDA configuration's shared memory fits one SM for this cache."""
    if not kernel.startswith(CUDA_PREFIX):
        return True
    config = parse_cuda_config(kernel)
    elt = torch.empty(0, dtype=kv_dtype).element_size()
    return config.ctas_per_sm * cuda_kernel.smem_bytes(config, elt, HEADS // KV_HEADS) <= (
        cuda_kernel.SMEM_PER_SM
    )


def decode_attention(
    curve: dict[str, Any], kernels: tuple[str, ...], budgets: dict[str, tuple[int, ...]]
) -> list[dict[str, Any]]:
    rows = []
    for kv_name, kv_dtype in (("bf16", torch.bfloat16), ("fp8", torch.float8_e4m3fn)):
        for batch, ctx, width in [(b, c, None) for b, c in DECODE_CASES] + [MIXED_CASE]:
            # correctness on random lengths (partial pages, short rows), budgeted and not
            args, _ = decode_inputs(batch, ctx, kv_dtype, random_lens=True, width=width)
            ref = paged_decode_attention_ref(*args)
            for kernel in [k for k in kernels if fits(k, kv_dtype)]:
                for budget in (16, None):
                    out = torch.full_like(args[0], float("nan"))
                    run_decode(kernel, args, budget, out)
                    check(f"decode {kernel} {kv_name} b{batch} ctx<={ctx} ctas={budget}", out, ref)
            del ref, args
            args, kv_bytes = decode_inputs(
                batch, ctx, kv_dtype, random_lens=width is not None, width=width
            )
            out = torch.empty_like(args[0])
            case = dict(cache=kv_name, batch=batch, context=ctx, mixed=width is not None)
            for kernel in [k for k in kernels if fits(k, kv_dtype)]:
                for mechanism, sms in [("cta_limited", k) for k in budgets["cta_limited"]] + [
                    ("green_context", k) for k in budgets["green_context"]
                ]:
                    green = mechanism == "green_context"
                    budget = None if green or sms == 132 else sms
                    fn = partial(run_decode, kernel, args, budget, out)
                    with torch.cuda.stream(green_stream(sms).stream) if green else nullcontext():
                        ms = bench_ms(fn)
                    torch.cuda.synchronize()
                    gbs, ceiling = kv_bytes / ms / 1e6, curve[mechanism][sms]
                    row = dict(mechanism=mechanism, sms=sms, ms=ms, gbs=gbs, ceiling_gbs=ceiling)
                    rows.append(dict(kernel=kernel, **case, **row, fraction=gbs / ceiling))
                print_rows(rows[-len(budgets["cta_limited"]) - len(budgets["green_context"]) :])
            del args, out
            torch.cuda.empty_cache()
    return rows


def print_rows(rows: list[dict[str, Any]]) -> None:
    for r in rows:
        print(
            f"{r['kernel']:16s} {r['cache']:4s} b{r['batch']:<5d} ctx{r['context']:<5d} "
            f"{r['mechanism']:13s} {r['sms']:3d} SMs {r['gbs']:7.0f} GB/s "
            f"({r['fraction']:.2f} of {r['ceiling_gbs']:.0f})",
            flush=True,
        )


# ---------------------------------------------------------------- 3. the small kernels
def small_kernel_cases(tokens: int) -> dict[str, tuple[int, Callable[[], Any]]]:
    hidden, inter = 4096, 14336
    dtype = torch.bfloat16

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, device=DEVICE, dtype=dtype)

    x, res, w = randn(tokens, hidden), randn(tokens, hidden), randn(hidden)
    qkv = randn(tokens, (HEADS + 2 * KV_HEADS) * HEAD_DIM)
    q, k, v = qkv.split([HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM], 1)
    q, k, v = (a.unflatten(1, (-1, HEAD_DIM)) for a in (q, k, v))
    positions = torch.randint(0, 8192, (tokens,), device=DEVICE)
    cos_sin = torch.randn(8192, HEAD_DIM, device=DEVICE)
    blocks = -(-tokens // PAGE)
    k_cache = torch.empty(blocks, KV_HEADS, PAGE, HEAD_DIM, device=DEVICE, dtype=dtype)
    slots = torch.randperm(blocks * PAGE, device=DEVICE)[:tokens]
    rope = (q, k, v, positions, cos_sin, k_cache, torch.empty_like(k_cache), slots)
    rope_bytes = tokens * HEAD_DIM * ((2 * HEADS + 4 * KV_HEADS) * 2 + 4)
    gate_up, act_out = randn(tokens, 2 * inter), randn(tokens, inter)
    return {
        "rms_norm+residual": (
            4 * tokens * hidden * 2,
            partial(rms_norm_triton, x, w, 1e-5, res, torch.empty_like(x)),
        ),
        "rope_kv_write": (rope_bytes, partial(rope_kv_write_triton, *rope)),
        "silu_and_mul": (3 * tokens * inter * 2, partial(silu_and_mul_triton, gate_up, act_out)),
    }


def small_kernels(curve: dict[str, Any]) -> list[dict[str, Any]]:
    rows = []
    for name, (nbytes, fn) in small_kernel_cases(2048).items():
        full = nbytes / bench_ms(fn) / 1e6
        with torch.cuda.stream(green_stream(32).stream):
            green = nbytes / bench_ms(fn) / 1e6
        torch.cuda.synchronize()
        for mechanism, sms, gbs, ceiling in (
            ("full_gpu", 132, full, curve["cta_limited"][132]),
            ("green_context", 32, green, curve["green_context"][32]),
        ):
            rows.append(dict(kernel=name, tokens=2048, mechanism=mechanism, sms=sms, gbs=gbs,
                             ceiling_gbs=ceiling, fraction=gbs / ceiling))  # fmt: skip
            print(f"{name:18s} {mechanism:13s} {gbs:7.0f} GB/s ({gbs / ceiling:.2f})", flush=True)
    return rows


# ---------------------------------------------------------------- 4. end to end
def throughput(num_prompts: int, kernel: str, out_dir: Path) -> dict[str, Any]:
    path = result_path(out_dir, gpu_name(), EXPERIMENT, f"throughput-512_512-fp8kv-{kernel}")
    path.parent.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    env.pop(CONFIG_ENV, None)
    if kernel == "triton":
        env[CONFIG_ENV] = TRITON_ONLY
    command = [
        sys.executable, "-m", "nanoflow.cli.main", "bench", "throughput", "llama-3-8b",
        "--load-format", "dummy", "--executor", "sequential", "--workload", "512/512",
        "--num-prompts", str(num_prompts), "--kv-cache-dtype", "fp8", "--max-num-seqs", "1024",
        "--cuda-graphs", "--output-json", str(path),
    ]  # fmt: skip
    started = time.perf_counter()
    subprocess.run(command, env=env, check=True)
    record = json.loads(path.read_text())
    result = record["result"]
    print(f"512/512 {kernel}: {result['tokens_per_s']:.0f} tokens/s, "
          f"{result.get('fraction_of_roofline', 0):.2f} of the roofline "
          f"({time.perf_counter() - started:.0f} s)", flush=True)  # fmt: skip
    return {"kernel": kernel, "command": " ".join(command), "result": result}


# ---------------------------------------------------------------- targets and main
def targets(results: dict[str, Any]) -> list[dict[str, Any]]:
    rows = []

    def target(name: str, measured: float | None, goal: float) -> None:
        if measured is not None:
            rows.append(dict(name=name, measured=measured, target=goal, direction="higher"))

    for cache in ("bf16", "fp8"):
        fractions = [
            r["fraction"] for r in results.get("decode", []) if r["kernel"] == "cuda" and
            r["cache"] == cache
        ]  # fmt: skip
        target(f"decode_{cache}_frac_of_ceiling_min", min(fractions, default=None), TARGET_FRACTION)
    small = [r["fraction"] for r in results.get("small", [])]
    target("small_kernels_frac_of_ceiling_min", min(small, default=None), TARGET_FRACTION)
    new = next((r for r in results.get("throughput", []) if r["kernel"] == "cuda"), None)
    if new is not None:
        target("throughput_512_512_fp8kv_tokens_per_s", new["result"]["tokens_per_s"], 34000)
        target("fraction_of_roofline", new["result"].get("fraction_of_roofline"), 0.70)
    return rows


def dry_run() -> dict[str, Any]:
    """CPU: the split plans a GPU launch would use, and the kernels' entry point under the
    interpreter against the reference on random lengths."""
    plans = {
        f"b{b}_ctx{c}": cuda_kernel.split_plan(b, KV_HEADS, -(-c // PAGE), 132 * 8, 4)
        for b, c in DECODE_CASES
    }
    q = torch.randn(3, 4, 64)
    k = torch.randn(6, 2, PAGE, 64)
    v = torch.randn(6, 2, PAGE, 64)
    tables = torch.tensor([[0, 1], [2, 3], [4, 5]], dtype=torch.int32)
    lens = torch.tensor([5, 32, 17], dtype=torch.int32)
    ref = paged_decode_attention_ref(q, k, v, tables, lens, 0.125)
    check(
        "decode triton (interpreter)",
        paged_decode_attention_triton(q, k, v, tables, lens, 0.125),
        ref,
    )
    return {"split_plans": plans}


def write(out_dir: Path, record: dict[str, Any], started: float) -> list[dict[str, Any]]:
    """Both JSON files from what has been measured so far; returns the target rows."""
    record.update(RESULTS, total_seconds=time.perf_counter() - started)
    write_json(result_path(out_dir, record.get("gpu"), EXPERIMENT, "llama-3-8b-shapes"), record)
    if not GPU:
        return []
    summary = {key: record.get(key) for key in ("gpu", "device", "command", "commit", "date")}
    summary["targets"] = targets(RESULTS)
    write_json(out_dir / "targets" / "memory-unit.json", summary)
    return summary["targets"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_out_argument(parser)
    parser.add_argument("--sections", default="read,decode,small,throughput")
    parser.add_argument(
        "--kernels",
        default="cuda;triton",
        help="decode kernels to time, ';'-separated: cuda, triton, or a forced cuda:... config",
    )
    parser.add_argument("--num-prompts", type=int, default=2000)
    parser.add_argument("--cta-budgets", default=",".join(map(str, CTA_BUDGETS)))
    parser.add_argument("--green-budgets", default=",".join(map(str, GREEN_BUDGETS)))
    args = parser.parse_args()
    out_dir = Path(args.out)
    sections = set(args.sections.split(","))
    budgets = {
        "cta_limited": tuple(int(k) for k in args.cta_budgets.split(",")),
        "green_context": tuple(int(k) for k in args.green_budgets.split(",")),
    }
    started = time.perf_counter()
    record: dict[str, Any] = {
        **environment(DEVICE),
        "experiment": "memory_unit",
        "command": " ".join(sys.argv),
        "commit": commit(),
    }
    if not GPU:
        RESULTS["dry_run"] = dry_run()
    else:
        curve = read_curve()
        RESULTS["read_curve"] = curve
        print("read curve, CTA-limited:", {k: round(v) for k, v in curve["cta_limited"].items()})
        print("read curve, green:", {k: round(v) for k, v in curve["green_context"].items()})
        steps = [
            ("decode", lambda: decode_attention(curve, tuple(args.kernels.split(";")), budgets)),
            ("small", lambda: small_kernels(curve)),
            ("throughput", lambda: [throughput(args.num_prompts, k, out_dir)
                                    for k in ("triton", "cuda")]),
        ]  # fmt: skip
        for name, step in steps:
            if name not in sections:
                continue
            try:
                RESULTS[name] = step()
            except Exception as err:  # one section's failure must not lose the others
                import traceback

                traceback.print_exc()
                RESULTS["errors"][name] = repr(err)
            write(out_dir, record, started)  # what is done survives a later section's end
    target_rows = write(out_dir, record, started)
    if GPU:
        for t in target_rows:
            met = t["measured"] >= t["target"]
            print(f"{t['name']:42s} {t['measured']:10.3f}  target {t['target']}  "
                  f"{'met' if met else 'MISSED'}")  # fmt: skip
    failed = [c for c in RESULTS["checks"] if not c["ok"]]
    print(f"{len(RESULTS['checks'])} checks, {len(failed)} failed; errors: {RESULTS['errors']}")
    return 1 if failed or RESULTS["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
