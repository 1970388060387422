"""GPU run for the engine and the nano-batch pipeline, in one call.

1. bf16 parity of the engine with transformers on a tiny random checkpoint.
2. Overlap microbenchmark: a Llama-3-8B gate-up GEMM beside paged decode attention, each on its own
   execution unit, for several SM splits and both mechanisms (CTA limits, green contexts), with
   the GEMM's own time beside attention and beside a plain copy of the same bytes.
3. End to end on llama-3-8b dummy weights: one fixed 2048-token iteration (512 decodes at
   ``--context`` + 1536 prefill tokens) timed per schedule (GPU time and CPU launch time; with
   ``--cuda-graphs`` also launched eagerly, and the replayed logits compared with the eager ones),
   greedy tokens of the executors compared, and offline 512/512 throughput for every schedule
   (``--skip throughput`` leaves it out, ``--schedules`` picks schedules by name). With
   ``--tables`` each schedule's iteration time is set beside its overlap bound from the op
   tables (``measured_over_bound``).
4. The timeline of one overlapped iteration, recorded inside the graph when graphs are on
   (``plots.py`` draws it).

Writes DIR/<gpu>/pipeline/<label>.json and DIR/<gpu>/timeline/<label>.json; the label (``--label``)
defaults to the sections run and the fixed iteration's shape.

Usage: python experiments/pipeline_bench.py [--out DIR] [--label L] [--num-prompts N]
           [--cuda-graphs] [--tables FILE|profile|roofline]
       python experiments/pipeline_bench.py --device cpu --model builtin ...   (a dry run)
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import sys
import time
import traceback
from pathlib import Path

import torch
from bench_schedules import candidate_schedules
from common import add_out_argument, result_path, stamp, write_json
from overlap_bench import overlap_microbench

from nanoflow import LLM, SamplingParams
from nanoflow.autotune.bound import compare, describe, iteration_bound, plan_batch, tables_for
from nanoflow.autotune.tables import OpTables
from nanoflow.config import EngineConfig
from nanoflow.engine.batch import PreparedStep, prepare_step
from nanoflow.engine.scheduler import BatchPlan, ScheduledChunk
from nanoflow.engine.sequence import Sequence
from nanoflow.measure import (
    copy_bandwidth_gbs,
    environment,
    gemm_ceiling_tflops,
    optimal_throughput,
    time_cuda,
    token_agreement,
)
from nanoflow.models.loader import resolve_model
from nanoflow.runtime.schedule import PipelineSchedule
from nanoflow.runtime.timeline import TimelineRecorder, save_timeline
from nanoflow.workloads import constant, random_prompts

DEVICE = torch.device("cuda")


def time_any(fn, iters: int = 10) -> float:
    """Median seconds of ``fn``: CUDA events on a GPU, the host clock on CPU."""
    if DEVICE.type == "cuda":
        return time_cuda(fn, iters=iters)
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def sync() -> None:
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


def parity_bf16() -> dict:
    """Engine (bf16, Triton kernels) vs transformers on the same tiny random checkpoint."""
    import tempfile

    import transformers

    cfg = transformers.LlamaConfig(
        vocab_size=256,
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        rope_theta=500000.0,
        bos_token_id=1,
        eos_token_id=2,
    )
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    # Norm gains near 1 and small layer weights, as in a trained model (a random net with large
    # weights is chaotic and amplifies any rounding); a wide LM head, so the top logits are apart
    # and greedy tokens are not decided by near-ties.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.3 if "lm_head" in name else 0.02)
    folder = tempfile.mkdtemp()
    model.save_pretrained(folder)
    low = torch.bfloat16 if DEVICE.type == "cuda" else torch.float32
    ref32 = model.to(DEVICE).eval()
    ref16 = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=low)
    ref16 = ref16.to(DEVICE).eval()
    prompts = [[(7 * i + 3 * j) % 250 + 3 for j in range(5 + 9 * i)] for i in range(8)]
    small = {"dtype": str(low).removeprefix("torch."), "device": str(DEVICE), "num_kv_blocks": 256}
    llm = LLM(folder, max_num_batched_tokens=32, **small)
    params = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)
    outs = llm.generate(prompts, params, use_tqdm=False)
    whole = LLM(folder, max_num_batched_tokens=1024, **small)
    same16 = same32 = 0
    rel_errs = []
    divergences = []
    for prompt, out in zip(prompts, outs, strict=True):
        got = out.outputs[0].token_ids
        ids = torch.tensor([prompt], device=DEVICE)
        with torch.no_grad():
            g16 = ref16.generate(
                ids, max_new_tokens=16, do_sample=False, eos_token_id=None, pad_token_id=0
            )[0, len(prompt) :].tolist()
            g32 = ref32.generate(
                ids, max_new_tokens=16, do_sample=False, eos_token_id=None, pad_token_id=0
            )[0, len(prompt) :].tolist()
            full = torch.tensor([prompt + got], device=DEVICE)
            want = ref32(full).logits[0, len(prompt) - 1 :].float()
        same16 += got == g16
        same32 += got == g32
        # engine logits of the same positions: prefill of prompt+output in one chunk
        seq_logits = _engine_logits(whole, prompt + got, len(prompt))
        rel_errs.append(((seq_logits - want).norm() / want.norm()).item())
        if got != g32:  # is the first disagreement a near-tie in the fp32 logits?
            step = next(i for i, (a, b) in enumerate(zip(got, g32, strict=True)) if a != b)
            top2 = want[step].topk(2).values
            divergences.append({
                "step": step,
                "fp32_top2_margin": (top2[0] - top2[1]).item(),
                "engine_max_abs_logit_error": (seq_logits[step] - want[step]).abs().max().item(),
            })  # fmt: skip
    return {
        "divergences_vs_fp32": divergences,
        "dtype": str(low),
        "prompts": len(prompts),
        "greedy_identical_vs_hf_same_dtype": same16,
        "greedy_identical_vs_hf_fp32": same32,
        "max_logits_rel_err_vs_fp32": max(rel_errs),
    }


def _engine_logits(llm: LLM, ids: list[int], first: int) -> torch.Tensor:
    """Logits at every position from ``first - 1`` on, one engine prefill at a time."""
    rows = []
    engine = llm.engine
    for end in range(first, len(ids) + 1):
        seq = engine.add_request(
            f"logit-{end}-{time.monotonic_ns()}", ids[:end], SamplingParams(max_tokens=1)
        )
        plan = engine.scheduler.plan()
        with torch.inference_mode():
            step = engine.runner.prepare(plan)
            logits = engine.runner.forward(step)
        engine.scheduler.commit(plan)
        engine.scheduler.finish(seq, "abort")
        rows.append(logits[0])
    return torch.stack(rows)


def fixed_plan(llm: LLM, decodes: int, ctx: int, prefill_chunks: int, chunk: int) -> BatchPlan:
    """Sequences placed straight in the cache (their K/V content does not matter for timing)."""
    engine = llm.engine
    bs = engine.config.block_size
    plan = BatchPlan()
    next_block = 0
    for i in range(decodes + prefill_chunks):
        length = ctx if i < decodes else chunk
        seq = Sequence(f"fixed-{i}", [5] * length, SamplingParams(max_tokens=4))
        n_blocks = -(-(length + 1) // bs)
        seq.block_table = list(range(next_block, next_block + n_blocks))
        next_block += n_blocks
        if i < decodes:
            seq.output_token_ids = [7]
            seq.num_computed_tokens = length
            plan.decodes.append(ScheduledChunk(seq, length, 1))
        else:
            plan.prefills.append(ScheduledChunk(seq, 0, chunk))
    assert next_block <= engine.runner.num_blocks, "cache too small for the fixed batch"
    return plan


def eager_step(llm: LLM, plan: BatchPlan) -> PreparedStep:
    """The plan laid out unpadded, to run with eager launches even when graphs are on."""
    runner = llm.engine.runner
    return prepare_step(plan, runner.schedule, runner.buffers, runner.config.block_size, DEVICE)


def graph_check(llm: LLM, plan: BatchPlan) -> dict:
    """Logits of one step three ways: unpadded and eager, padded and eager, padded and replayed
    from the graph. Replay against padded-eager isolates the capture; padded against unpadded
    shows what other GEMM shapes change in bf16."""
    runner = llm.engine.runner
    with torch.inference_mode():
        eager = runner.forward(eager_step(llm, plan)).clone()
        step = runner.prepare(plan)
        replayed = runner.forward(step).clone()
        padded = runner.forward(dataclasses.replace(step, replay=None)).clone()

    def compare(a: torch.Tensor, b: torch.Tensor) -> dict:
        return {
            "max_abs_diff": (a - b).abs().max().item(),
            "argmax_agreement": (a.argmax(-1) == b.argmax(-1)).float().mean().item(),
        }

    return {
        "rows": eager.shape[0],
        "max_abs_logit": eager.abs().max().item(),
        "replayed_vs_padded_eager": compare(replayed, padded),
        "padded_vs_unpadded_eager": compare(padded, eager),
    }


def time_iteration(llm: LLM, plan: BatchPlan, eager: bool = False) -> dict:
    runner = llm.engine.runner
    with torch.inference_mode():
        step = eager_step(llm, plan) if eager else runner.prepare(plan)
        gpu = time_any(lambda: runner.forward(step))
        cpu = []
        for _ in range(5):
            sync()
            start = time.perf_counter()
            runner.forward(step)
            cpu.append(time.perf_counter() - start)
            sync()
    return {
        "gpu_ms": gpu * 1e3,
        "cpu_launch_ms": sorted(cpu)[2] * 1e3,
        "tokens": plan.num_tokens,
        "tokens_per_s": plan.num_tokens / gpu,
    }


def throughput(llm: LLM, num_prompts: int, in_len: int, out_len: int) -> dict:
    requests = constant(in_len, out_len, num_prompts)
    prompts = random_prompts(requests, llm.engine.spec.vocab_size, seed=1)
    params = SamplingParams(max_tokens=out_len, temperature=0.0, ignore_eos=True)
    sync()
    llm.engine.reset_stats()
    graphs = llm.engine.runner.graphs
    start = time.perf_counter()
    llm.generate(prompts, params, use_tqdm=False)
    sync()
    elapsed = time.perf_counter() - start
    result = {
        "num_prompts": num_prompts,
        "elapsed_s": elapsed,
        "tokens_per_s": num_prompts * (in_len + out_len) / elapsed,
        "iterations": llm.engine.stats.summary(),
    }
    if graphs is not None:  # the throughput above includes capturing the run's new shapes
        result["cuda_graphs"] = graphs.stats.summary()
    return result


def bound_tables(args: argparse.Namespace) -> OpTables | None:
    """The op tables of ``--tables``, measured before the engine takes the GPU's memory."""
    if args.tables is None:
        print("no op tables (--tables): no overlap bound beside the iteration times")
        return None
    config = EngineConfig(model=args.model, device=str(DEVICE), kv_cache_dtype=args.kv_cache_dtype)
    spec, _ = resolve_model(args.model)
    dtype, kv_dtype = config.torch_dtype(DEVICE), config.torch_kv_dtype(DEVICE)
    return tables_for(args.tables, spec, args.model, DEVICE, dtype, kv_dtype)


def overlap_bound(
    tables: OpTables, name: str, schedule: PipelineSchedule, plan: BatchPlan, timed: dict
) -> dict:
    """The fixed iteration's bound under ``schedule`` beside its untimed GPU time."""
    batch, rows = plan_batch(plan)
    bound = iteration_bound(tables, schedule, batch, rows)
    summary = compare([bound], timed["gpu_ms"] / 1e3)
    print(f"{name}: {describe(summary)}", flush=True)
    return {**summary, "terms": bound.to_dict()}


def end_to_end(timeline: Path, args: argparse.Namespace, gemm_tflops: float | None) -> dict:
    tables = bound_tables(args)
    dummy = "auto" if args.model == "builtin" else "dummy"
    llm = LLM(
        args.model,
        load_format=dummy,
        device=str(DEVICE),
        max_num_batched_tokens=args.budget,
        num_kv_blocks=args.num_kv_blocks,
        max_num_seqs=args.max_num_seqs,
        cuda_graphs=args.cuda_graphs,
        kv_cache_dtype=args.kv_cache_dtype,
    )
    schedules = candidate_schedules(llm.engine.config, DEVICE)
    if args.schedules:
        schedules = {k: v for k, v in schedules.items() if k in args.schedules.split(",")}
    quarter = args.budget // 4
    plan = fixed_plan(
        llm, decodes=quarter, ctx=args.context, prefill_chunks=args.prefill_chunks, chunk=quarter
    )
    prompts = random_prompts(constant(64, 1, 24), llm.engine.spec.vocab_size, seed=2)
    greedy = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)
    result: dict = {"num_kv_blocks": llm.engine.runner.num_blocks, "schedules": {}}
    result["bound_tables"] = args.tables
    result["bound_interference"] = tables.interference if tables is not None else None
    reference_tokens = None
    if llm.engine.runner.graphs is not None:  # the reference runs eagerly, graphs are checked
        llm.engine.runner.graphs = None
        outs = llm.generate(prompts, greedy, use_tqdm=False)
        reference_tokens = [o.outputs[0].token_ids for o in outs]
        result["reference"] = "sequential executor, eager launches"
    optimal = optimal_throughput(llm.engine.spec, gemm_tflops * 1e12) if gemm_tflops else None
    result["optimal_tokens_per_s"] = optimal
    for name, schedule in schedules.items():
        row: dict = {"schedule": schedule.to_dict()}
        try:
            llm.engine.runner.set_schedule(schedule)
            row["iteration"] = time_iteration(llm, plan)
            if tables is not None:
                row["overlap_bound"] = overlap_bound(tables, name, schedule, plan, row["iteration"])
            if llm.engine.runner.graphs is not None:
                row["iteration_eager"] = time_iteration(llm, plan, eager=True)
                row["graph_check"] = graph_check(llm, plan)
            if name == args.timeline and DEVICE.type == "cuda":
                result["timeline"] = record_timeline(llm, plan, timeline, name, row["iteration"])
            if "throughput" in args.skip:
                result["schedules"][name] = row
                print(name, json.dumps({k: v for k, v in row.items() if k != "schedule"}))
                continue
            tokens = [o.outputs[0].token_ids for o in llm.generate(prompts, greedy, use_tqdm=False)]
            reference_tokens = reference_tokens or tokens
            row["greedy_16_identical_to_sequential"] = token_agreement(tokens, reference_tokens)
            row["throughput"] = throughput(llm, args.num_prompts, args.input_len, args.output_len)
            if optimal:
                row["fraction_of_optimal"] = row["throughput"]["tokens_per_s"] / optimal
            if schedule.overlap and "timeline" not in result and DEVICE.type == "cuda":
                result["timeline"] = record_timeline(llm, plan, timeline, name, row["iteration"])
        except Exception as exc:
            row["error"] = f"{type(exc).__name__}: {exc}"
            traceback.print_exc()
        result["schedules"][name] = row
        print(name, json.dumps({k: v for k, v in row.items() if k != "schedule"}), flush=True)
    return result


def record_timeline(llm: LLM, plan: BatchPlan, path: Path, name: str, untimed: dict) -> dict:
    """One iteration's timeline: launched eagerly, or with graphs on, captured with its timing
    events inside the graph and replayed (so the host's launch gaps are not in it).

    The events can perturb what they time, so the record keeps the whole timed iteration's span
    beside ``untimed`` (the same iteration's timing without events): a timeline whose span is
    well above it does not show the schedule as it runs."""
    runner = llm.engine.runner
    graphed = runner.graphs is not None
    recorder = TimelineRecorder(in_graph=graphed)
    with torch.inference_mode():
        step = runner.prepare(plan)
        runner.forward(step)
        if graphed:
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                recorder.attach(runner.executor)
                runner.model.embed(step.input_ids, runner.buffers)
                runner.executor.run(runner.model.layer_ops, runner.buffers, step.nano_batches)
            graph.replay()
        else:
            recorder.attach(runner.executor)
            runner.forward(step)
        runner.executor.hook = None
    every = recorder.records()
    span_ms = max(r.end_ms for r in every) - min(r.start_ms for r in every)
    records = [r for r in every if r.layer < 4]
    how = "CUDA graph replay" if graphed else "eager launch"
    title = f"{llm.engine.config.model}, {name} ({how}), layers 0-3 of one "
    title += f"{plan.num_tokens}-token iteration ({len(plan.decodes)} decodes)"
    check = {"timed_span_ms": span_ms, "untimed_gpu_ms": untimed.get("gpu_ms")}
    provenance = stamp({**environment(DEVICE), "title": title, "schedule": name, **check})
    path.parent.mkdir(parents=True, exist_ok=True)
    save_timeline(records, path, provenance)
    print(f"timeline of {name}: timed span {span_ms:.1f} ms, untimed {check['untimed_gpu_ms']} ms")
    return {"file": path.name, **check}


def default_label(args: argparse.Namespace) -> str:
    """The sections run and, with the end-to-end one, the fixed iteration's shape."""
    parts = [s for s in ("parity", "overlap", "e2e") if s not in args.skip]
    if "e2e" in parts:
        parts += [f"ctx{args.context}", f"chunks{args.prefill_chunks}", f"budget{args.budget}"]
        parts += ["graphs"] if args.cuda_graphs else []
        parts += ["fp8kv"] if args.kv_cache_dtype == "fp8" else []
    return "-".join(parts) or "nothing"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    add_out_argument(parser)
    parser.add_argument("--label", default=None, help="names the result files")
    parser.add_argument("--num-prompts", type=int, default=300)
    parser.add_argument("--model", default="llama-3-8b")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--budget", type=int, default=2048, help="token budget per iteration")
    parser.add_argument("--context", type=int, default=1024, help="fixed batch: decode context")
    parser.add_argument(
        "--prefill-chunks",
        type=int,
        default=3,
        help="fixed batch: prompt chunks of budget/4 tokens beside the decodes (0: decodes only)",
    )
    parser.add_argument("--input-len", type=int, default=512)
    parser.add_argument("--output-len", type=int, default=512)
    parser.add_argument("--num-kv-blocks", type=int, default=None)
    parser.add_argument(
        "--cuda-graphs", action="store_true", help="replay iterations from CUDA graphs"
    )
    parser.add_argument(
        "--skip", action="append", default=[], help="parity|overlap|e2e|throughput (of e2e)"
    )
    parser.add_argument("--schedules", default=None, help="comma list of e2e schedule names")
    parser.add_argument("--kv-cache-dtype", default="auto", choices=["auto", "fp8"])
    parser.add_argument("--max-num-seqs", type=int, default=512)
    parser.add_argument("--timeline", default=None, help="schedule whose timeline to draw")
    parser.add_argument(
        "--tables",
        default=None,
        help="op tables for the overlap bound: a JSON file from `nanoflow tune --tables-out`, "
        "'profile' to measure them in this run (GPU) or 'roofline'",
    )
    args = parser.parse_args()
    global DEVICE
    DEVICE = torch.device(args.device)
    record = {**environment(DEVICE), "experiment": "pipeline"}
    label = args.label or default_label(args)
    path = result_path(args.out, record["gpu"], "pipeline", label)
    timeline = result_path(args.out, record["gpu"], "timeline", label)
    gemm = None
    if DEVICE.type == "cuda":
        gemm = record["gemm_tflops"] = gemm_ceiling_tflops(DEVICE)
        record["copy_gbs"] = copy_bandwidth_gbs(DEVICE)
        print("ceilings", record["gemm_tflops"], record["copy_gbs"], flush=True)
    else:
        args.skip.append("overlap")
    sections = {
        "parity": parity_bf16,
        "overlap": lambda: overlap_microbench(DEVICE),
        "e2e": lambda: end_to_end(timeline, args, gemm),
    }
    for name, fn in sections.items():
        if name in args.skip:
            continue
        started = time.perf_counter()
        try:
            record[name] = fn()
        except Exception as exc:
            record[name] = {"error": f"{type(exc).__name__}: {exc}"}
            traceback.print_exc()
        record[name + "_seconds"] = time.perf_counter() - started
        gc.collect()  # free this section's engines before the next one sizes its KV cache
        if DEVICE.type == "cuda":
            torch.cuda.empty_cache()
        write_json(path, record)
    print(json.dumps(record.get("parity"), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
