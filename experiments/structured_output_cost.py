"""Per-token cost of grammar-constrained decoding against unconstrained decoding, in one run.

The same batch (default 256 requests, fixed output length, EOS ignored) is decoded twice by one
engine: once free, once with every request held to a JSON schema through xgrammar token masks
in the sampler. The figure is the decode phase's wall time per generated token (steps that
prefill nothing, timed as the engine runs them, with its host work overlapping the GPU's), so
the overhead is what the masks add beyond that overlap: filling each row's bitmask on the host,
applying it on the device, and reading constrained tokens back to advance the grammars.

A model without a tokenizer (dummy registry weights) gets a synthetic raw vocabulary of its size,
so the mask's width is the real one; pass ``--tokenizer`` to measure with the real vocabulary, or
``--vocab-file`` for a published byte-level BPE vocabulary cut to the model's size: a tiktoken
file (lines of base64 token and rank, as Llama 3's ``tokenizer.model``) or a Mistral tekken JSON.
What the fill costs depends on the vocabulary: a token the grammar cannot judge from its state
alone (one holding a quote inside a JSON string, say) is checked row by row, and random strings
hold many more of those than a trained vocabulary does.

Usage: python experiments/structured_output_cost.py [--model llama-3-8b] [--batch 256]
           [--input-len 128] [--output-len 128] [--tokenizer DIR] [--label L] [--out DIR]
           [--vocab-file FILE]
       python experiments/structured_output_cost.py --dry-run   (builtin model on CPU, tiny)
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import json
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from common import add_out_argument, write_result
from step_probe import StepProbe

from nanoflow.config import EngineConfig
from nanoflow.engine.engine_core import EngineCore
from nanoflow.engine.grammar import GrammarCompiler, constrain, fill_threads
from nanoflow.engine.sampling_params import SamplingParams, StructuredOutput
from nanoflow.engine.tokenizer import load_tokenizer
from nanoflow.measure import environment
from nanoflow.models.loader import resolve_model

# Unbounded strings in an array: a random-weight model keeps writing inside the grammar for the
# whole output instead of closing it early.
SCHEMA = {"type": "array", "items": {"type": "string"}}


def synthetic_info(vocab_size: int, stop_token_ids: list[int]) -> object:
    """A raw vocabulary of ``vocab_size`` distinct printable tokens (the 95 printable ASCII
    characters, then strings of 2-8 of them), for models that come without a tokenizer."""
    import xgrammar

    rng = random.Random(0)
    alphabet = [chr(c) for c in range(32, 127)]
    vocab, seen = list(alphabet), set(alphabet)
    while len(vocab) < vocab_size:
        token = "".join(rng.choices(alphabet, k=rng.randint(2, 8)))
        if token not in seen:
            seen.add(token)
            vocab.append(token)
    vocab = vocab[:vocab_size]
    return xgrammar.TokenizerInfo(
        vocab, xgrammar.VocabType.RAW, vocab_size=vocab_size, stop_token_ids=stop_token_ids
    )


def file_vocabulary(path: Path) -> list[bytes]:
    """The tokens of a byte-level BPE vocabulary file, by id: a tiktoken file (``base64 rank``
    a line) or a Mistral tekken JSON (its special tokens first, as placeholders)."""
    text = path.read_text()
    if path.suffix != ".json":
        ranked = {
            int(rank): base64.b64decode(token)
            for token, rank in (line.split() for line in text.splitlines() if line)
        }
        return [ranked[i] for i in range(len(ranked))]
    tekken = json.loads(text)
    specials = tekken["config"]["default_num_special_tokens"]
    tokens = [base64.b64decode(t["token_bytes"]) for t in tekken["vocab"]]
    return [f"<SPECIAL_{i}>".encode() for i in range(specials)] + tokens


def file_info(path: Path, vocab_size: int, stop_token_ids: list[int]) -> object:
    """``path``'s vocabulary cut to the model's ``vocab_size`` ids, as xgrammar reads it."""
    import xgrammar

    tokens = file_vocabulary(path)
    if len(tokens) < vocab_size:
        raise SystemExit(f"{path} holds {len(tokens)} tokens, fewer than the model's {vocab_size}")
    return xgrammar.TokenizerInfo(
        tokens[:vocab_size], xgrammar.VocabType.RAW, vocab_size=vocab_size,
        stop_token_ids=stop_token_ids,
    )  # fmt: skip


def decode_cost(
    engine: EngineCore,
    compiler: GrammarCompiler | None,
    args: argparse.Namespace,
    label: str,
) -> dict[str, float]:
    """Decode one batch; wall seconds per generated token over the iterations without prefill."""
    vocab = engine.spec.vocab_size
    rng = random.Random(1)
    for i in range(args.batch):
        prompt = [rng.randrange(3, vocab) for _ in range(args.input_len)]
        params = SamplingParams(
            max_tokens=args.output_len, temperature=1.0, seed=i, ignore_eos=True
        )
        seq = engine.add_request(f"{label}-{i}", prompt, params)
        if compiler is not None:
            constrain(seq, compiler.matcher(StructuredOutput("json_schema", json.dumps(SCHEMA))))
    engine.reset_stats()
    traced: list[Any] = []
    timeline = _Timeline(engine, args.timeline_dir, label)
    probe = StepProbe(engine.runner)
    with probe.install():
        step_seconds, tokens = _decode(engine, args, timeline, traced)
    seconds, iterations = sum(step_seconds), len(step_seconds)
    return {
        "decode_seconds": seconds,
        "decode_tokens": tokens,
        "decode_iterations": iterations,
        "ms_per_token": 1e3 * seconds / max(1, tokens),
        "step_wall_ms": _spread(step_seconds),
        "engine": engine.stats.summary(),
        "traced_steps": len(traced),
        "kernels_ms_per_traced_step": _kernel_totals(traced),
        "steps": probe.summary(),
        "gc": probe.gc_summary(),
    } | (probe.masks_summary() if compiler is not None else {})


def _spread(seconds: list[float]) -> dict[str, Any]:
    """Median, 90th percentile and the five longest of the timed steps, in ms: a mean pulled by
    one long host stall shows here."""
    ms = sorted(1e3 * s for s in seconds) or [0.0]
    return {"median": statistics.median(ms), "p90": ms[int(0.9 * (len(ms) - 1))],
            "longest": ms[-5:][::-1]}  # fmt: skip


def _decode(engine: EngineCore, args: argparse.Namespace, timeline: _Timeline, traced: list[Any]
            ) -> tuple[list[float], int]:  # fmt: skip
    """Run the engine dry: the wall seconds of each decode-only step, and their tokens."""
    step_seconds, tokens = [], 0
    while engine.has_unfinished:
        timeline.at(len(step_seconds))
        tracing = len(step_seconds) == TRACE_AT and len(traced) < args.trace_steps
        trace = _trace(engine) if tracing else contextlib.nullcontext()
        started = time.perf_counter()
        with trace as profile:
            outputs = engine.step()  # no device sync: the engine's own pipelining is timed
        elapsed = time.perf_counter() - started
        if profile is not None:
            traced.append(profile)
        elif engine.last_step.num_prefill_tokens == 0 and outputs:
            step_seconds.append(elapsed)
            tokens += sum(len(o.new_token_ids) for o in outputs)
    return step_seconds, tokens


TRACE_AT = 64  # decode steps into a run, where the profiler watches ``--trace-steps`` steps
TIMELINE_AT, TIMELINE_STEPS = 80, 4  # the consecutive decode steps a timeline trace covers


class _Timeline:
    """With ``--timeline-dir`` on a GPU, a profiler trace (host threads and GPU streams) of a
    few consecutive decode steps, written as DIR/<label>-timeline.json for a trace viewer."""

    def __init__(self, engine: EngineCore, folder: str | None, label: str) -> None:
        self.folder, self.label, self.profile = folder, label, None
        self.enabled = folder is not None and engine.runner.device.type == "cuda"

    def at(self, decode_steps: int) -> None:
        if not self.enabled:
            return
        if decode_steps == TIMELINE_AT and self.profile is None:
            from torch.profiler import ProfilerActivity, profile

            self.profile = profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA])
            self.profile.start()
        elif decode_steps == TIMELINE_AT + TIMELINE_STEPS and self.profile is not None:
            self.profile.stop()
            folder = Path(self.folder)
            folder.mkdir(parents=True, exist_ok=True)
            self.profile.export_chrome_trace(str(folder / f"{self.label}-timeline.json"))
            self.enabled = False


def _trace(engine: EngineCore) -> Any:
    """A profiler around one step on a GPU (it yields the profile), else a no-op context
    (yields None); traced steps are left out of the timed ones."""
    if engine.runner.device.type != "cuda":
        return contextlib.nullcontext()
    from torch.profiler import ProfilerActivity, profile

    return profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA])


def _kernel_totals(profiles: list[Any], top: int = 12) -> dict[str, float]:
    """GPU milliseconds per traced step of the kernels that took most, by name."""
    totals: dict[str, float] = {}
    for prof in profiles:
        for event in prof.key_averages():
            device_us = getattr(event, "self_device_time_total", 0.0)
            if device_us > 0:
                totals[event.key] = totals.get(event.key, 0.0) + device_us / 1e3
    ranked = sorted(totals.items(), key=lambda kv: -kv[1])[:top]
    return {name[:80]: ms / max(1, len(profiles)) for name, ms in ranked}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="llama-3-8b")
    p.add_argument("--load-format", default="dummy")
    p.add_argument("--tokenizer", default=None)
    p.add_argument("--vocab-file", type=Path, default=None,
                   help="for a model without a tokenizer: a tiktoken or tekken vocabulary file "
                   "to build the grammars over instead of the synthetic one")  # fmt: skip
    p.add_argument("--device", default="auto")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--label", default=None)
    p.add_argument("--timeline-dir", default=None,
                   help="write a profiler trace of a few consecutive decode steps of each run "
                   "there (GPU only)")  # fmt: skip
    p.add_argument("--trace-steps", type=int, default=3,
                   help="decode steps of each run traced by the profiler on a GPU (left out of "
                   "the timing); their kernels' GPU time is recorded")  # fmt: skip
    p.add_argument("--dry-run", action="store_true", help="builtin model on CPU, a tiny batch")
    add_out_argument(p)
    args = p.parse_args(argv)
    if args.dry_run:
        args.model, args.load_format, args.device = "builtin", "auto", "cpu"
        args.batch, args.input_len, args.output_len = 4, 8, 8
    config = EngineConfig(
        model=args.model,
        load_format=args.load_format,
        device=args.device,
        tokenizer=args.tokenizer,
        max_num_seqs=args.batch,
        max_model_len=args.input_len + args.output_len + 16,
    )
    _, checkpoint = resolve_model(args.model)
    tokenizer = load_tokenizer(args.tokenizer or checkpoint)
    engine = EngineCore(config)
    vocab, stops = engine.spec.vocab_size, sorted(engine.eos_token_ids)
    info, vocabulary = None, "tokenizer"
    if tokenizer is None and args.vocab_file is not None:
        info, vocabulary = file_info(args.vocab_file, vocab, stops), args.vocab_file.name
    elif tokenizer is None:
        info, vocabulary = synthetic_info(vocab, stops), "synthetic"
    compiler = GrammarCompiler(tokenizer, vocab, stops, tokenizer_info=info)
    decode_cost(engine, None, args, "warmup")
    free = decode_cost(engine, None, args, "free")
    constrained = decode_cost(engine, compiler, args, "constrained")
    record = {
        **environment(engine.runner.device),
        "args": {k: str(v) for k, v in vars(args).items()},
        "schema": SCHEMA,
        "vocabulary": vocabulary,
        "grammar_fill_threads": fill_threads(),
        "unconstrained": free,
        "constrained": constrained,
        "overhead_per_token": constrained["ms_per_token"] / free["ms_per_token"] - 1.0,
    }
    label = args.label or f"{args.model}-b{args.batch}"
    path = write_result(args.out, "structured_output", label, record, " ".join(sys.argv))
    print(f"wrote {path}: overhead per token {record['overhead_per_token']:+.1%}; per step "
          f"{1e3 * free['decode_seconds'] / max(1, free['decode_iterations']):.2f} ms free, "
          f"catch-up {constrained['wait_ms_per_step']:.2f} ms and mask fill "
          f"{constrained['fill_ms_per_step']:.2f} ms when constrained")  # fmt: skip
    for name, run in (("free", free), ("constrained", constrained)):
        steps = run["steps"].items()
        medians = ", ".join(f"{k} {v['median']:.2f}/{v['mean']:.2f}" for k, v in steps)
        pauses = run["gc"]
        wall = run["step_wall_ms"]
        print(
            f"  {name} step median/mean (ms): {medians}; gc {pauses['collections']} "
            f"{pauses['ms_total']:.1f} ms, longest {pauses['ms_max']:.1f}; wall median "
            f"{wall['median']:.2f}, p90 {wall['p90']:.2f}, longest "
            f"{', '.join(f'{ms:.1f}' for ms in wall['longest'])}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
