"""FP8 (W8A8) against bf16 on the GPU, in one call.

1. GEMMs at ``--tokens`` (2048) on the llama-3-8b layer shapes (QKV, O, gate-up, down): bf16
   through cuBLASLt (``addmm``) against the e4m3 row-scaled ``torch._scaled_mm`` on activations
   already quantized, and the end-to-end FP8 linear (the quantizing pass + the GEMM); each FP8
   result checked against the reference (dequantize, then matmul).
2. The quantizing kernels (RMSNorm + residual, SiLU-and-mul, the plain pass) at those shapes,
   each checked against its reference and timed beside the unquantized kernel it replaces.
3. Accuracy: ``fp8_accuracy.py`` on the builtin model (the small checkpoint) and on the 8B
   shapes with dummy weights, bf16 against FP8.
4. llama-3-8b 512/512, fp8 KV cache, ``--num-prompts`` (2000) prompts, through
   ``nanoflow bench throughput`` with bf16 and with FP8 weights, each against the optimal bound
   at the bf16 and at the FP8 GEMM rate measured in section 1.

Writes DIR/<gpu>/fp8/llama-3-8b.json and the targets to DIR/targets/fp8.json (DIR defaulting
to experiments/results). Without a GPU it does a dry run of every section (tiny shapes, the
references and the Triton kernels under the interpreter, the builtin model on CPU) into
DIR/cpu/fp8/dry-run.json and writes no targets.

``--extra-workloads`` (on a GPU ``512/1024,sharegpt``) adds the pair on a decode-heavy and a
dataset-shaped workload, ``--extra-num-prompts`` (1000) prompts each, so the whole call stays
under ten minutes on an H200.

Usage: python experiments/fp8_bench.py [--out DIR] [--sections gemm,kernels,accuracy,throughput]
           [--extra-workloads W,W]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

GPU = torch.cuda.is_available()
if not GPU:  # the Triton kernels run under the interpreter on CPU tensors
    os.environ.setdefault("TRITON_INTERPRET", "1")

import fp8_accuracy  # noqa: E402
from common import (  # noqa: E402
    add_out_argument,
    commit,
    nanoflow_exe,
    queued_seconds,
    rel_err,
    result_path,
    target_rows,
    write_json,
    write_targets,
)

from nanoflow.kernels.activation import silu_and_mul_ref, silu_and_mul_triton  # noqa: E402
from nanoflow.kernels.fp8_linear import (  # noqa: E402
    fp8_linear_cublas,
    fp8_linear_ref,
    quantize_weight,
)
from nanoflow.kernels.gemm import linear_cublas, linear_ref  # noqa: E402
from nanoflow.kernels.norm import rms_norm_ref, rms_norm_triton  # noqa: E402
from nanoflow.kernels.quant import (  # noqa: E402
    quantize_fp8_ref,
    quantize_fp8_triton,
    rms_norm_quant_ref,
    rms_norm_quant_triton,
    silu_and_mul_quant_ref,
    silu_and_mul_quant_triton,
)
from nanoflow.measure import environment, optimal_throughput  # noqa: E402
from nanoflow.models.registry import get_known_model  # noqa: E402

DEVICE = torch.device("cuda" if GPU else "cpu")
MODEL = "llama-3-8b"
TARGETS = {  # name: (goal, direction)
    "fp8_gemm_speedup_2048": (1.6, "higher"),
    "fp8_linear_speedup_2048": (1.5, "higher"),
    "fp8_weights_tokens_per_s": (44000.0, "higher"),
    "fp8_over_bf16_weights_throughput": (1.45, "higher"),
    "fp8_logits_rel_err": (0.10, "lower"),
}


def layer_shapes(tiny: bool) -> dict[str, tuple[int, int]]:
    """(N, K) of each dense GEMM of a llama-3-8b layer (tiny stand-ins for the dry run)."""
    if tiny:
        return {"qkv": (96, 64), "o": (64, 64), "gate_up": (256, 64), "down": (64, 128)}
    spec = get_known_model(MODEL)
    h, i = spec.hidden_size, spec.intermediate_size
    return {"qkv": (spec.q_size + 2 * spec.kv_size, h), "o": (h, spec.q_size),
            "gate_up": (2 * i, h), "down": (h, i)}  # fmt: skip


def carveout_slowdown(
    fns: dict[str, Callable[[], Any]], full: dict[str, float], sms: int
) -> dict[str, float]:
    """Each GEMM's time with ``sms`` SMs carved out over its time on the full GPU: above 1 when
    the GEMM honours the carve-out an execution unit sets."""
    torch._C._set_sm_carveout_experimental(sms)
    try:
        return {name: queued_seconds(fn) / full[name] for name, fn in fns.items()}
    finally:
        torch._C._set_sm_carveout_experimental(None)


def gemm_section(tokens: int, tiny: bool) -> dict[str, Any]:
    dtype = torch.bfloat16 if GPU else torch.float32
    bf16_gemm = linear_cublas if GPU else linear_ref
    fp8_gemm = fp8_linear_cublas if GPU else fp8_linear_ref
    rows: dict[str, Any] = {}
    for name, (n, k) in layer_shapes(tiny).items():
        gen = torch.Generator(DEVICE).manual_seed(0)
        x = torch.randn(tokens, k, device=DEVICE, generator=gen).to(dtype)
        w = (torch.randn(n, k, device=DEVICE, generator=gen) * 0.02).to(dtype)
        wq = quantize_weight(w)
        out = torch.empty(tokens, n, device=DEVICE, dtype=dtype)
        xq, xs = quantize_fp8_triton(x)
        t_bf16 = queued_seconds(lambda x=x, w=w, out=out: bf16_gemm(x, w, None, None, out))
        t_gemm = queued_seconds(
            lambda xq=xq, wq=wq, xs=xs, out=out: fp8_gemm(xq, wq, None, None, out, x_scale=xs)
        )
        t_quant = queued_seconds(lambda x=x: quantize_fp8_triton(x))
        got = fp8_gemm(xq, wq, None, None, out.clone(), x_scale=xs)
        want = fp8_linear_ref(xq, wq, None, None, torch.empty_like(out), x_scale=xs)
        flops = 2 * tokens * n * k
        rows[name] = {
            "n": n, "k": k, "bf16_s": t_bf16, "fp8_gemm_s": t_gemm, "quantize_s": t_quant,
            "bf16_tflops": flops / t_bf16 / 1e12, "fp8_tflops": flops / t_gemm / 1e12,
            "gemm_speedup": t_bf16 / t_gemm, "linear_speedup": t_bf16 / (t_gemm + t_quant),
            "rel_err_vs_reference": rel_err(got, want),
            "rel_err_vs_bf16": rel_err(got, x.float() @ w.float().t()),
        }  # fmt: skip
        print(f"{name:8s} bf16 {rows[name]['bf16_tflops']:7.1f} fp8 {rows[name]['fp8_tflops']:7.1f}"
              f" TFLOP/s: GEMM {rows[name]['gemm_speedup']:.2f}x, with quantize "
              f"{rows[name]['linear_speedup']:.2f}x", flush=True)  # fmt: skip
        if GPU and name == "gate_up":
            rows[name]["carveout_66_slowdown"] = carveout_slowdown(
                {"bf16": lambda x=x, w=w, out=out: bf16_gemm(x, w, None, None, out),
                 "fp8": lambda xq=xq, wq=wq, xs=xs, out=out: fp8_gemm(xq, wq, None, None, out,
                                                                      x_scale=xs)},
                {"bf16": t_bf16, "fp8": t_gemm}, 66,
            )  # fmt: skip
    total = {
        key: sum(r[key] for r in rows.values()) for key in ("bf16_s", "fp8_gemm_s", "quantize_s")
    }
    flops = sum(2 * tokens * r["n"] * r["k"] for r in rows.values())
    return {
        "tokens": tokens,
        "shapes": rows,
        "layer_gemm_speedup": total["bf16_s"] / total["fp8_gemm_s"],
        "layer_linear_speedup": total["bf16_s"] / (total["fp8_gemm_s"] + total["quantize_s"]),
        "bf16_tflops": flops / total["bf16_s"] / 1e12,
        "fp8_tflops": flops / total["fp8_gemm_s"] / 1e12,
        "checks_ok": all(r["rel_err_vs_reference"] < 0.01 for r in rows.values()),
    }


def e4m3_check(got: tuple, want: tuple) -> dict[str, Any]:
    """Scales equal to fp32 rounding, values equal but for rare one-step differences; under the
    interpreter, whose e4m3 cast puts a value that rounds up to a power of two in the binade
    below, those elements may be half the reference's."""
    (g, gs), (w, ws) = got, want
    g, w = g.float(), w.float()
    differ = g != w
    if not GPU:
        power_of_two = (w != 0) & (torch.exp2(torch.log2(w.abs()).round()) == w.abs())
        differ &= ~(power_of_two & (g == w / 2))
    beyond_one_step = differ & ((g - w).abs() > w.abs() / 8 + 2**-9)
    scale_err = ((gs - ws).abs() / ws.abs()).max().item()
    fraction = differ.float().mean().item()
    ok = scale_err <= 1e-5 and fraction <= 0.01 and not bool(beyond_one_step.any())
    return {"ok": ok, "differing_fraction": fraction, "scale_rel_err_max": scale_err}


def kernel_section(tokens: int, tiny: bool) -> dict[str, Any]:
    dtype = torch.bfloat16 if GPU else torch.float32
    shapes = layer_shapes(tiny)
    hidden, inter = shapes["o"][0], shapes["down"][1]
    gen = torch.Generator(DEVICE).manual_seed(1)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, device=DEVICE, generator=gen).to(dtype)

    x, res, w = randn(tokens, hidden), randn(tokens, hidden), randn(hidden)
    gate_up, attn = randn(tokens, 2 * inter), randn(tokens, shapes["o"][1])
    norm = rms_norm_triton if GPU else rms_norm_ref
    timed_res = res.clone()  # timed runs keep adding into one residual: no copy in the timing
    cases = {
        "rms_norm_quant": (
            lambda r=None: rms_norm_quant_triton(x, w, 1e-5, res.clone() if r is None else r),
            lambda: rms_norm_quant_ref(x, w, 1e-5, res.clone()),
            lambda: norm(x, w, 1e-5, timed_res),
        ),
        "silu_and_mul_quant": (
            lambda r=None: silu_and_mul_quant_triton(gate_up),
            lambda: silu_and_mul_quant_ref(gate_up),
            lambda: silu_and_mul_triton(gate_up) if GPU else silu_and_mul_ref(gate_up),
        ),
        "quantize_fp8": (
            lambda r=None: quantize_fp8_triton(attn), lambda: quantize_fp8_ref(attn), None
        ),
    }  # fmt: skip
    rows = {}
    for name, (kernel, reference, unquantized) in cases.items():
        rows[name] = e4m3_check(kernel(), reference())
        rows[name]["seconds"] = queued_seconds(lambda kernel=kernel: kernel(timed_res))
        if unquantized is not None:
            rows[name]["unquantized_seconds"] = queued_seconds(unquantized)
        print(f"{name:20s} {'ok' if rows[name]['ok'] else 'MISMATCH'} "
              f"{rows[name]['seconds'] * 1e6:.1f} us", flush=True)  # fmt: skip
    return {"tokens": tokens, "kernels": rows, "checks_ok": all(r["ok"] for r in rows.values())}


def accuracy_section(out: Path, tiny: bool) -> dict[str, Any]:
    """Writes fp8_accuracy.py's own results under ``out`` too."""
    device = "cuda" if GPU else "cpu"
    small = ["--stream-len", "64", "--prompts", "2", "--steps", "4"] if tiny else []
    runs = {"builtin": ["--model", "builtin"]}
    if not tiny:
        runs[MODEL] = ["--model", MODEL, "--load-format", "dummy"]
    results = {}
    for label, args in runs.items():
        record = fp8_accuracy.main([*args, *small, "--device", device, "--out", str(out)])
        results[label] = {key: record[key] for key in (
            "reference_dtype", "logits_rel_err", "top1_agreement_on_stream", "greedy_agreement",
            "mean_first_divergence_step", "perplexity_reference", "perplexity_fp8",
        )}  # fmt: skip
    return results


def throughput_section(args: argparse.Namespace, tiny: bool, gemm: dict | None) -> dict[str, Any]:
    """The pair at ``--workload`` (the targets'), then at each of ``--extra-workloads``."""
    out = weights_pair(args.workload, args.num_prompts, tiny, gemm)
    extra = [w for w in args.extra_workloads.split(",") if w]
    if extra:
        out["other_workloads"] = {
            workload: weights_pair(workload, args.extra_num_prompts, tiny, gemm)
            for workload in extra
        }
    return out


def weights_pair(workload: str, num_prompts: int, tiny: bool, gemm: dict | None) -> dict[str, Any]:
    """bf16 and FP8 weights on one workload; a run that fails is recorded and the other kept."""
    model = "builtin" if tiny else MODEL
    spec = get_known_model(MODEL) if not tiny else None
    base = [nanoflow_exe(), "bench", "throughput", model, "--load-format", "dummy",
            "--executor", "sequential", "--workload", workload,
            "--num-prompts", str(num_prompts), "--kv-cache-dtype", "fp8",
            "--max-num-seqs", "1024"]  # fmt: skip
    base += ["--cuda-graphs", "--device", "cuda"] if GPU else ["--device", "cpu"]
    runs = {}
    with tempfile.TemporaryDirectory() as folder:
        for weights, extra in (("bf16", []), ("fp8", ["--quantization", "fp8"])):
            path = Path(folder) / f"{weights}.json"
            command = [*base, *extra, "--output-json", str(path)]
            try:
                subprocess.run(command, check=True)
                result = json.loads(path.read_text())["result"]
            except (subprocess.CalledProcessError, OSError, KeyError, ValueError) as exc:
                runs[weights] = {"command": " ".join(command[1:]), "error": repr(exc)}
                continue
            runs[weights] = {"command": " ".join(command[1:]), "tokens_per_s":
                             result["tokens_per_s"], "result": result}  # fmt: skip
            print(
                f"{workload} {weights} weights: {result['tokens_per_s']:.0f} tokens/s",
                flush=True,
            )
    ok = [weights for weights, run in runs.items() if "tokens_per_s" in run]
    out: dict[str, Any] = {"workload": workload, "num_prompts": num_prompts, "runs": runs,
                           "checks_ok": len(ok) == len(runs)}  # fmt: skip
    if out["checks_ok"]:
        out["fp8_over_bf16"] = runs["fp8"]["tokens_per_s"] / runs["bf16"]["tokens_per_s"]
    if spec is not None and gemm and "bf16_tflops" in gemm:
        for rate in ("bf16", "fp8"):
            bound = optimal_throughput(spec, gemm[f"{rate}_tflops"] * 1e12)
            out[f"optimal_at_{rate}_gemm_rate"] = bound
            for weights in ok:
                out[f"{weights}_weights_fraction_of_optimal_at_{rate}"] = (
                    runs[weights]["tokens_per_s"] / bound
                )
    return out


def targets(record: dict[str, Any]) -> list[dict[str, Any]]:
    """The issue's target rows from what this run measured (a section that failed or did not
    run gives none; the GEMM rows only at 2048 tokens)."""
    gemm = record.get("gemm") or {}
    gemm = gemm if gemm.get("tokens") == 2048 else {}
    measured = {
        "fp8_gemm_speedup_2048": gemm.get("layer_gemm_speedup"),
        "fp8_linear_speedup_2048": gemm.get("layer_linear_speedup"),
        "fp8_weights_tokens_per_s": (record.get("throughput") or {})
        .get("runs", {}).get("fp8", {}).get("tokens_per_s"),
        "fp8_over_bf16_weights_throughput": (record.get("throughput") or {}).get("fp8_over_bf16"),
        "fp8_logits_rel_err": (record.get("accuracy") or {}).get("builtin", {})
        .get("logits_rel_err"),
    }  # fmt: skip
    return target_rows(measured, TARGETS)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_out_argument(parser)
    parser.add_argument("--sections", default="gemm,kernels,accuracy,throughput")
    parser.add_argument("--tokens", type=int, default=2048 if GPU else 64)
    parser.add_argument("--workload", default="512/512" if GPU else "16/8")
    parser.add_argument(
        "--extra-workloads",
        default="512/1024,sharegpt" if GPU else "",
        help="more workloads for the bf16/FP8 pair, comma-separated (a decode-heavy and "
        "a dataset-shaped one; each pair takes minutes on the GPU)",
    )
    parser.add_argument("--num-prompts", type=int, default=2000 if GPU else 4)
    parser.add_argument("--extra-num-prompts", type=int, default=1000 if GPU else 4)
    args = parser.parse_args(argv)
    tiny = not GPU
    sections = set(args.sections.split(","))
    started = time.perf_counter()
    env = environment(DEVICE)
    record: dict[str, Any] = {
        **env,
        "experiment": "fp8",
        "device": env.get("gpu") or "cpu",
        "dry_run": tiny,
        "command": " ".join(["python", *sys.argv]),
        "commit": commit(),
    }
    with tempfile.TemporaryDirectory() as scratch:
        runs: dict[str, Callable[[], dict[str, Any]]] = {
            "gemm": lambda: gemm_section(args.tokens, tiny),
            "kernels": lambda: kernel_section(args.tokens, tiny),
            "accuracy": lambda: accuracy_section(Path(scratch) if tiny else args.out, tiny),
            "throughput": lambda: throughput_section(args, tiny, record.get("gemm")),
        }
        for name, run in runs.items():
            if name not in sections:
                continue
            try:
                record[name] = run()
            except Exception as exc:  # one GPU call: a failed section must not lose the others
                print(f"section {name} failed: {exc!r}", file=sys.stderr, flush=True)
                record[name] = {"error": repr(exc), "checks_ok": False}
    record["total_seconds"] = time.perf_counter() - started
    label = "dry-run" if tiny else MODEL
    write_json(result_path(args.out, env.get("gpu"), "fp8", label), record)
    if GPU:
        write_targets(args.out, "fp8", record, targets(record))
    return 0 if all(record.get(s, {}).get("checks_ok", True) for s in sections) else 1


if __name__ == "__main__":
    sys.exit(main())
