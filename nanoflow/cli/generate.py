"""``nanoflow generate``: prompts in, text out."""

from __future__ import annotations

import argparse
import json
import sys

from nanoflow.cli.main import add_engine_args, engine_kwargs
from nanoflow.errors import RequestError


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("generate", help="generate text for prompts (offline)")
    add_engine_args(p)
    p.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable)")
    p.add_argument(
        "--prompt-ids",
        action="append",
        default=[],
        help="a prompt as space-separated token ids (repeatable; for tokenizer-less dummy models)",
    )
    p.add_argument("--prompts-file", default=None, help="one prompt per line ('-' for stdin)")
    p.add_argument("--max-tokens", type=int, default=32, help="tokens to generate per prompt")
    p.add_argument("--temperature", type=float, default=0.0, help="0 picks the likeliest token")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling: keep this much mass")
    p.add_argument("--top-k", type=int, default=0, help="keep the k likeliest tokens (0: all)")
    p.add_argument("--sample-seed", type=int, default=None, help="per-request sampling seed")
    p.add_argument("--stop", action="append", default=[], help="stop at this text (repeatable)")
    p.add_argument("--ignore-eos", action="store_true", help="generate past end-of-sequence")
    p.add_argument("--json", action="store_true", help="print one JSON object per prompt")
    p.set_defaults(func=run)


def _prompts(args: argparse.Namespace) -> list[str | list[int]]:
    prompts: list[str | list[int]] = list(args.prompt)
    try:
        prompts += [[int(t) for t in ids.split()] for ids in args.prompt_ids]
    except ValueError:
        raise RequestError("--prompt-ids takes integers separated by spaces") from None
    if args.prompts_file:
        stream = sys.stdin if args.prompts_file == "-" else open(args.prompts_file)  # noqa: SIM115
        with stream:
            prompts += [line.rstrip("\n") for line in stream if line.strip()]
    return prompts or ["Hello, my name is", "The capital of France is"]


def run(args: argparse.Namespace) -> int:
    from nanoflow import LLM, SamplingParams

    llm = LLM(args.model, **engine_kwargs(args))
    print(f"# {llm.engine.schedule_source}", file=sys.stderr)
    params = SamplingParams(
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        seed=args.sample_seed,
        stop=args.stop,
        ignore_eos=args.ignore_eos,
    )
    prompts = _prompts(args)
    for prompt, out in zip(prompts, llm.generate(prompts, params), strict=True):
        completion = out.outputs[0]
        if args.json:
            print(
                json.dumps(
                    {
                        "prompt": prompt,
                        "text": completion.text,
                        "token_ids": completion.token_ids,
                        "finish_reason": completion.finish_reason,
                        **out.metrics,
                    }
                )
            )
        else:
            print(f"{prompt!r} -> {completion.text!r} ({completion.finish_reason})")
    return 0
