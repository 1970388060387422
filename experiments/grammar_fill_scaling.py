"""How the host cost of a batch of grammar token masks scales with threads, in one run.

A batch of matchers of one JSON schema (the structured-output benchmark's) is walked through
random allowed tokens, as a random-weight model under the mask would walk it, and at every step
the batch's masks are filled by each strategy in turn, all on the same matcher states:

* ``xgrammar[k]``: one ``BatchGrammarMatcher(k)`` call (xgrammar starts k native threads for it);
* ``slices[k]``: k long-lived Python threads, each filling a contiguous slice of the rows with
  its own single-threaded batch call (native code, the interpreter released);
* ``rows``: one ``fill_next_token_bitmask`` call per row on one thread.

The tokens are then accepted in one ``batch_accept_token`` call, also timed. The figures are
medians over the steps, in milliseconds for the whole batch; every strategy's masks are checked
equal to the per-row fill's.

Usage: python experiments/grammar_fill_scaling.py [--vocab-file FILE] [--vocab-size 128256]
           [--batch 256] [--steps 16] [--threads 1,2,4,8,14] [--label L] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
from common import add_out_argument, write_result
from structured_output_cost import SCHEMA, file_info, synthetic_info

from nanoflow.measure import environment

STOP = 2  # the stop token of the synthetic and file vocabularies alike


def slice_filler(threads: int) -> Callable[[list[Any], torch.Tensor], None]:
    """Fill with ``threads`` Python threads over contiguous slices of the rows."""
    import xgrammar

    pool = ThreadPoolExecutor(threads)
    single = [xgrammar.BatchGrammarMatcher(1) for _ in range(threads)]

    def fill(matchers: list[Any], bitmask: torch.Tensor) -> None:
        bounds = [len(matchers) * i // threads for i in range(threads + 1)]
        jobs = [
            pool.submit(single[i].batch_fill_next_token_bitmask, matchers[lo:hi], bitmask,
                        list(range(lo, hi)))
            for i, (lo, hi) in enumerate(zip(bounds, bounds[1:], strict=False)) if hi > lo
        ]  # fmt: skip
        for job in jobs:
            job.result()

    return fill


def strategies(threads: list[int]) -> dict[str, Callable[[list[Any], torch.Tensor], None]]:
    import xgrammar

    out: dict[str, Callable[[list[Any], torch.Tensor], None]] = {}
    for k in threads:
        batch = xgrammar.BatchGrammarMatcher(k)
        out[f"xgrammar[{k}]"] = lambda ms, bm, b=batch: b.batch_fill_next_token_bitmask(ms, bm)
    for k in threads:
        if k > 1:
            out[f"slices[{k}]"] = slice_filler(k)
    return out


def fill_rows(matchers: list[Any], bitmask: torch.Tensor) -> None:
    for row, matcher in enumerate(matchers):
        matcher.fill_next_token_bitmask(bitmask, row)


def walk(args: argparse.Namespace, info: Any) -> dict[str, Any]:
    import xgrammar

    compiler = xgrammar.GrammarCompiler(info, max_threads=1)
    grammar = compiler.compile_json_schema(json.dumps(SCHEMA), any_whitespace=False)
    fresh = lambda: xgrammar.GrammarMatcher(grammar)  # noqa: E731
    matchers = [fresh() for _ in range(args.batch)]
    reference = xgrammar.allocate_token_bitmask(args.batch, args.vocab_size)
    bitmask = torch.empty_like(reference)
    fillers = strategies(args.threads)
    times: dict[str, list[float]] = {name: [] for name in ["rows", *fillers, "accept"]}
    mismatches = 0
    rng = random.Random(0)
    batch = xgrammar.BatchGrammarMatcher(1)
    for _ in range(args.steps):
        started = time.perf_counter()
        fill_rows(matchers, reference)
        times["rows"].append(time.perf_counter() - started)
        for name, fill in fillers.items():
            bitmask.fill_(0)
            started = time.perf_counter()
            fill(matchers, bitmask)
            times[name].append(time.perf_counter() - started)
            mismatches += int(not torch.equal(bitmask, reference))
        allowed = xgrammar.testing.bitmask_to_bool_mask(reference, args.vocab_size)
        tokens = []
        for row in range(args.batch):
            ids = allowed[row].nonzero().flatten()
            ids = ids[ids != STOP]
            tokens.append(int(ids[rng.randrange(len(ids))]) if len(ids) else STOP)
        started = time.perf_counter()
        batch.batch_accept_token(matchers, tokens)
        times["accept"].append(time.perf_counter() - started)
        matchers = [fresh() if m.is_terminated() else m for m in matchers]
    return {
        "ms_median": {name: 1e3 * statistics.median(t) for name, t in times.items()},
        "ms_max": {name: 1e3 * max(t) for name, t in times.items()},
        "mismatched_fills": mismatches,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--vocab-file", type=Path, default=None,
                   help="a tiktoken or tekken vocabulary file (default: synthetic)")  # fmt: skip
    p.add_argument("--vocab-size", type=int, default=128256)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--steps", type=int, default=16)
    p.add_argument(
        "--threads", type=lambda s: [int(x) for x in s.split(",")], default=[1, 2, 4, 8, 14]
    )
    p.add_argument("--label", default=None)
    add_out_argument(p)
    args = p.parse_args(argv)
    if args.vocab_file is not None:
        info, vocabulary = file_info(args.vocab_file, args.vocab_size, [STOP]), args.vocab_file.name
    else:
        info, vocabulary = synthetic_info(args.vocab_size, [STOP]), "synthetic"
    result = walk(args, info)
    record = {
        **environment(torch.device("cpu")),
        "args": {k: str(v) for k, v in vars(args).items()},
        "host_cpus": os.cpu_count(),
        "vocabulary": vocabulary,
        "schema": SCHEMA,
        **result,
    }
    label = args.label or f"{vocabulary.split('.')[0]}-b{args.batch}"
    path = write_result(args.out, "grammar_fill", label, record, " ".join(sys.argv))
    row = "  ".join(f"{k} {v:.2f}" for k, v in result["ms_median"].items())
    print(f"{vocabulary}: {row} (ms, median); mismatched fills {result['mismatched_fills']}")
    print(f"wrote {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
