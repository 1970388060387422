"""Replay the engine's scheduler for an offline run, without a model or a GPU: how many
iterations it makes, how full their token budget is, and how many carry no prompt tokens.

Offline throughput depends on that mix as much as on the kernels: a run of N prompts fills the
budget only once enough sequences decode beside the prompts, and ends with a drain in which the
last sequences decode alone. The replay runs the real ``Scheduler`` and ``BlockManager`` (every
sampled token counted as produced), so with a measured run's settings it gives that run's
iteration count and tokens per iteration exactly; ``--result`` takes the settings from a
``bench throughput`` result file and prints both.

Usage: python experiments/schedule_replay.py --workload 512/512 --num-prompts 2000,8000 \
           --max-num-seqs 1024 --num-kv-blocks 109494 [--label L] [--out DIR | --output-json F]
       python experiments/schedule_replay.py \
           --result experiments/results/nvidia-h200/throughput/<label>.json
Writes ``<out>/cpu/schedule_replay/<label>.json`` (label: the workload and sequence limit, or the
replayed result's own label).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from common import add_out_argument, slug, write_json, write_result

from nanoflow.engine.block_manager import BlockManager
from nanoflow.engine.sampling_params import SamplingParams
from nanoflow.engine.scheduler import Scheduler
from nanoflow.engine.sequence import Sequence
from nanoflow.workloads import load_workload


def replay(
    lengths: list[tuple[int, int]], budget: int, max_num_seqs: int, num_blocks: int, block: int
) -> dict[str, float]:
    """The iteration mix of serving every (input, output) length pair offline."""
    scheduler = Scheduler(BlockManager(num_blocks, block), budget, max_num_seqs)
    for i, (input_len, output_len) in enumerate(lengths):
        params = SamplingParams(max_tokens=output_len, ignore_eos=True)
        scheduler.add(Sequence(str(i), [1] * input_len, params))
    iterations = tokens = decodes = decode_only = 0
    while scheduler.has_unfinished:
        plan = scheduler.plan()
        if not plan:
            raise RuntimeError("the scheduler made an empty plan: the cache is too small")
        scheduler.commit(plan)
        iterations += 1
        tokens += plan.num_tokens
        decodes += len(plan.decodes)
        decode_only += not plan.prefills
        for chunk in plan.chunks:
            if chunk.samples:
                chunk.seq.output_token_ids.append(0)
                if len(chunk.seq.output_token_ids) == chunk.seq.params.max_tokens:
                    scheduler.finish(chunk.seq, "length")
    return {
        "iterations": iterations,
        "tokens_per_iteration": tokens / iterations,
        "budget_filled": tokens / iterations / budget,
        "decodes_per_iteration": decodes / iterations,
        "decode_only_fraction": decode_only / iterations,
    }


def settings_of(result_file: Path) -> tuple[argparse.Namespace, dict]:
    """A throughput result's workload and engine settings, and its measured iteration mix."""
    record = json.loads(result_file.read_text())
    args, result = record["args"], record["result"]
    settings = argparse.Namespace(
        workload=args["workload"],
        num_prompts=str(args["num_prompts"]),
        max_num_batched_tokens=result["token_budget"],
        max_num_seqs=args["max_num_seqs"],
        num_kv_blocks=result["num_kv_blocks"],
        block_size=args["block_size"],
        seed=args["seed"],
    )
    return settings, result["iterations"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--result", type=Path, help="take the settings from this result file")
    parser.add_argument("--workload", default="512/512")
    parser.add_argument("--num-prompts", default="2000", help="comma list")
    parser.add_argument("--max-num-batched-tokens", type=int, default=2048)
    parser.add_argument("--max-num-seqs", type=int, default=512)
    parser.add_argument("--num-kv-blocks", type=int, default=54747)
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--label", default=None, help="names the result file")
    add_out_argument(parser)
    parser.add_argument("--output-json", type=Path, help="this file instead of --out's")
    args = parser.parse_args(argv)
    measured = None
    if args.result:
        given = args
        args, measured = settings_of(args.result)
        args.output_json, args.out = given.output_json, given.out
        args.label = given.label or f"{given.result.parent.parent.name}-{given.result.stem}"
    label = args.label or f"{slug(args.workload)}-seqs{args.max_num_seqs}"
    rows = []
    for n in (int(x) for x in args.num_prompts.split(",")):
        requests = load_workload(args.workload, n, args.seed)
        lengths = [(r.input_len, r.output_len) for r in requests]
        mix = replay(
            lengths, args.max_num_batched_tokens, args.max_num_seqs, args.num_kv_blocks,
            args.block_size,
        )  # fmt: skip
        rows.append({"num_prompts": n, **mix})
        print(f"{n:>6} prompts: {mix['iterations']} iterations, "
              f"{mix['tokens_per_iteration']:.0f} tokens each ({mix['budget_filled']:.0%} of the "
              f"budget), {mix['decode_only_fraction']:.0%} without prompt tokens")  # fmt: skip
    if measured:
        print(f"measured: {measured['iterations']} iterations, "
              f"{measured['tokens_per_iteration']:.0f} tokens each")  # fmt: skip
    settings = {k: v for k, v in vars(args).items() if k not in ("output_json", "out", "label")}
    record = {"experiment": "schedule_replay", "device": "cpu (no model)", "replays": rows}
    record |= {"settings": settings, "measured": measured}
    if args.output_json:
        print(write_json(args.output_json, record))
    else:
        print(write_result(args.out, "schedule_replay", label, record))
    return 0


if __name__ == "__main__":
    sys.exit(main())
