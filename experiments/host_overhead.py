"""The engine loop's host work per iteration, with the model's forward stubbed out (CPU).

A full GPU iteration leaves the host only the work around the forward: planning, laying out and
uploading the step, sampling and resolving tokens. This script runs the engine's real scheduler,
row layout, graph-buffer uploads (the path a CUDA-graph replay takes, with a capture that runs
nothing) and token resolution on the builtin model's shapes, returns zero logits in place of the
forward, and times each phase and the cyclic garbage collector. It says how much host time an
iteration costs at a given batch, so it can be compared with the GPU time of the same iteration
(`nanoflow bench throughput` reports both on a GPU).

``--sampled`` samples every request (temperature 1, seeded) instead of decoding greedily. With
``--structured`` every request is also held to the JSON schema of ``structured_output_cost.py``,
as that benchmark does on the GPU, and the grammars' two phases are timed too: the catch-up on
the engine's thread (inside "sample", since it runs at the launch) and the masks' fill on the
mask thread. Where the masks are filled beside a GPU forward, the engine's thread's total is
what has to stay shorter than the forward.

Usage: python experiments/host_overhead.py [--num-prompts N] [--gc-threshold N] [--label L]
           [--sampled] [--structured] [--out DIR]  (writes DIR/cpu/host_overhead/<label>.json)
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from collections import defaultdict

import torch
from common import add_out_argument, write_result
from step_probe import StepProbe
from structured_output_cost import SCHEMA

from nanoflow.config import EngineConfig
from nanoflow.engine.engine_core import EngineCore
from nanoflow.engine.grammar import GrammarCompiler, constrain
from nanoflow.engine.model_runner import ModelRunner
from nanoflow.engine.sampling_params import SamplingParams, StructuredOutput
from nanoflow.engine.tokenizer import load_tokenizer
from nanoflow.measure import environment
from nanoflow.models.loader import resolve_model
from nanoflow.workloads import load_workload, random_prompts


class HostOnlyRunner(ModelRunner):
    """The CUDA-graph path with a capture that runs nothing and zero logits for the forward, so
    only the host's work of an iteration remains; times its preparation and its sampling."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.graphs = self.step_graphs(lambda run: lambda: None)
        self.seconds: dict[str, float] = defaultdict(float)

    def prepare(self, plan):
        started = time.perf_counter()
        step = super().prepare(plan)
        self.seconds["prepare (layout + upload)"] += time.perf_counter() - started
        return step

    def forward(self, step) -> torch.Tensor:
        return torch.zeros(len(step.sample_rows), self.spec.vocab_size)

    def launch(self, plan, previous):
        started, before = time.perf_counter(), self.seconds["prepare (layout + upload)"]
        flight = super().launch(plan, previous)
        prepared = self.seconds["prepare (layout + upload)"] - before
        self.seconds["sample"] += time.perf_counter() - started - prepared
        return flight


def structured_compiler(engine: EngineCore) -> GrammarCompiler:
    """Grammars over the builtin model's tokenizer."""
    _, checkpoint = resolve_model("builtin")
    stops = sorted(engine.eos_token_ids)
    return GrammarCompiler(load_tokenizer(checkpoint), engine.spec.vocab_size, stops)


def host_only_engine(args: argparse.Namespace) -> EngineCore:
    config = EngineConfig(
        model="builtin",
        device="cpu",
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.budget,
        num_kv_blocks=args.num_kv_blocks,
        max_model_len=2048,
    )
    return EngineCore(config, runner_class=HostOnlyRunner)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_out_argument(parser)
    parser.add_argument("--workload", default="512/512")
    parser.add_argument("--num-prompts", type=int, default=3000)
    parser.add_argument("--max-num-seqs", type=int, default=1024)
    parser.add_argument("--budget", type=int, default=2048)
    parser.add_argument("--num-kv-blocks", type=int, default=80000)
    parser.add_argument("--warmup-steps", type=int, default=700, help="until the batch is full")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument(
        "--gc-threshold", type=int, default=None, help="young-generation threshold to run with"
    )
    parser.add_argument("--label", default="default", help="names the result file")
    parser.add_argument(
        "--sampled", action="store_true", help="temperature 1 and a seed a request, not greedy"
    )
    parser.add_argument(
        "--structured", action="store_true", help="every request held to a JSON schema (sampled)"
    )
    args = parser.parse_args()
    torch.set_num_threads(2)
    engine = host_only_engine(args)
    if args.gc_threshold is not None:  # after the engine set its own
        gc.set_threshold(args.gc_threshold, *gc.get_threshold()[1:])
    requests = load_workload(args.workload, args.num_prompts, 0)
    prompts = random_prompts(requests, engine.spec.vocab_size, 0)
    params = SamplingParams(max_tokens=requests[0].output_len, temperature=0.0, ignore_eos=True)
    compiler = structured_compiler(engine) if args.structured else None
    for i, prompt in enumerate(prompts):
        if args.sampled or compiler is not None:
            params = SamplingParams(
                max_tokens=requests[0].output_len, temperature=1.0, seed=i, ignore_eos=True
            )
        seq = engine.add_request(str(i), prompt, params)
        if compiler is not None:
            constrain(seq, compiler.matcher(StructuredOutput("json_schema", json.dumps(SCHEMA))))
    for _ in range(args.warmup_steps):
        engine.step()
    engine.runner.seconds.clear()
    engine.reset_stats()
    probe = StepProbe(engine.runner)
    decodes = 0
    with probe.install():
        started = time.perf_counter()
        for _ in range(args.steps):
            engine.step()
            decodes += engine.last_step.num_decode
        wall = time.perf_counter() - started
    collector = probe.collector
    stats = engine.stats
    phases = {"plan": stats.plan_seconds, **engine.runner.seconds, "resolve": stats.resolve_seconds}
    per_step = {name: 1e3 * s / args.steps for name, s in phases.items()}
    result = {
        "workload": args.workload,
        "sampling": "structured" if args.structured else "sampled" if args.sampled else "greedy",
        "steps": args.steps,
        "decodes_per_iteration": decodes / args.steps,
        "gc_threshold": gc.get_threshold(),
        "host_ms_per_iteration": 1e3 * wall / args.steps,
        "phase_ms_per_iteration": per_step,
        "gc_ms_per_iteration": 1e3 * collector.seconds / args.steps,
        "gc_collections_by_generation": collector.collections,
    }
    if args.structured:
        result["structured"] = {"schema": SCHEMA, **probe.masks_summary()}
    print(json.dumps(result, indent=1))
    record = {
        **environment(torch.device("cpu")),
        "experiment": "host_overhead",
        "result": result,
    }
    print(write_result(args.out, "host_overhead", args.label, record))
    return 0


if __name__ == "__main__":
    sys.exit(main())
