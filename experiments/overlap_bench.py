"""Overlap microbenchmark (GPU): a GEMM and decode attention co-running on two execution
units, against each alone on its unit and on the whole GPU, and the GEMM's own time beside
attention and beside a plain copy of the same bytes."""

from __future__ import annotations

import json

import torch
from bench_schedules import overlapped

from nanoflow.measure import time_cuda
from nanoflow.runtime.schedule import Mechanism, PipelineSchedule
from nanoflow.runtime.units import build_units


def overlap_microbench(device: torch.device) -> list[dict]:
    """A Llama-3-8B gate-up GEMM beside paged decode attention, each on its own unit, for
    several SM splits and both mechanisms."""
    from nanoflow import kernels

    results = []
    for tokens, ctx in ((2048, 1024), (1024, 2048)):
        x = torch.randn(tokens, 4096, device=device, dtype=torch.bfloat16)
        w = torch.randn(2 * 14336, 4096, device=device, dtype=torch.bfloat16) * 0.02
        y = torch.empty(tokens, 2 * 14336, device=device, dtype=torch.bfloat16)
        batch, bs = 256, 16
        blocks_per_seq = ctx // bs
        k_cache = torch.randn(
            batch * blocks_per_seq, 8, bs, 128, device=device, dtype=torch.bfloat16
        )
        v_cache = torch.randn_like(k_cache)
        tables = torch.randperm(batch * blocks_per_seq, device=device, dtype=torch.int32)
        tables = tables.view(batch, blocks_per_seq)
        lens = torch.full((batch,), ctx, device=device, dtype=torch.int32)
        q = torch.randn(batch, 32, 128, device=device, dtype=torch.bfloat16)
        out = torch.empty_like(q)

        def gemm(sms, x=x, w=w, y=y):
            return kernels.linear(x, w, None, sms, y)

        def attn(sms, q=q, k=k_cache, v=v_cache, t=tables, n=lens, o=out):
            return kernels.paged_decode_attention(q, k, v, t, n, 0.088, sms, o)

        src = torch.empty(2 * k_cache.numel(), device=device, dtype=torch.bfloat16)
        dst = torch.empty_like(src)

        def copy(sms, src=src, dst=dst):  # attention's K/V bytes as a plain stream
            return dst.copy_(src)

        full_gemm = time_cuda(lambda: gemm(None))
        full_attn = time_cuda(lambda: attn(None))
        for mechanism in Mechanism:
            for compute, memory in ((100, 32), (96, 36), (88, 44), (64, 68)):
                row = {
                    "tokens": tokens,
                    "context": ctx,
                    "mechanism": mechanism.value,
                    "compute_sms": compute,
                    "memory_sms": memory,
                    "gemm_full_ms": full_gemm * 1e3,
                    "attn_full_ms": full_attn * 1e3,
                }
                try:
                    schedule = overlapped(compute, memory, mechanism)
                    row.update(_corun(schedule, device, gemm, attn, copy))
                except Exception as exc:  # record and go on: one mechanism may be unavailable
                    row["error"] = f"{type(exc).__name__}: {exc}"
                results.append(row)
                print(json.dumps(row), flush=True)
    return results


def _gemm_span_beside(cu, mu, gemm, other, reps: int = 10) -> float:
    """Median seconds the GEMM takes on its unit while ``other`` runs on the memory unit
    (launched first): what co-running costs the GEMM itself."""
    spans = []
    for _ in range(reps + 2):
        main = torch.cuda.current_stream()
        cu.stream.wait_stream(main)
        mu.stream.wait_stream(main)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        with mu.active():
            other(mu.cta_budget)
        with cu.active():
            start.record()
            gemm(cu.cta_budget)
            end.record()
        main.wait_stream(cu.stream)
        main.wait_stream(mu.stream)
        torch.cuda.synchronize()
        spans.append(start.elapsed_time(end) / 1e3)
    return sorted(spans[2:])[reps // 2]


def _corun(schedule: PipelineSchedule, device: torch.device, gemm, attn, copy) -> dict:
    """Each alone on its unit, both at once, and the GEMM's own time beside decode attention
    and beside a plain copy of the same bytes: a GEMM that slows as much beside the copy is
    losing to the memory traffic, not to attention's kernel."""
    units = build_units(schedule, device)
    cu, mu = units["compute"], units["memory"]

    def on(unit, fn):
        main = torch.cuda.current_stream()
        unit.stream.wait_stream(main)
        with unit.active():
            fn(unit.cta_budget)
        main.wait_stream(unit.stream)

    def both():
        main = torch.cuda.current_stream()
        cu.stream.wait_stream(main)
        mu.stream.wait_stream(main)
        with cu.active():
            gemm(cu.cta_budget)
        with mu.active():
            attn(mu.cta_budget)
        main.wait_stream(cu.stream)
        main.wait_stream(mu.stream)

    g = time_cuda(lambda: on(cu, gemm))
    a = time_cuda(lambda: on(mu, attn))
    c = time_cuda(both)
    return {
        "gemm_part_ms": g * 1e3,
        "attn_part_ms": a * 1e3,
        "copy_part_ms": time_cuda(lambda: on(mu, copy)) * 1e3,
        "corun_ms": c * 1e3,
        "corun_over_max_part": c / max(g, a),
        "gemm_beside_attn_ms": _gemm_span_beside(cu, mu, gemm, attn) * 1e3,
        "gemm_beside_copy_ms": _gemm_span_beside(cu, mu, gemm, copy) * 1e3,
        "unit_sms": {n: u.num_sms for n, u in units.items()},
    }
