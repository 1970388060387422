"""Offline generation: ``LLM(model).generate(prompts, SamplingParams(...))``."""

from __future__ import annotations

import itertools
import logging
from dataclasses import dataclass, field
from typing import Any

from tqdm import tqdm

from nanoflow.config import EngineConfig
from nanoflow.engine.engine_core import EngineCore
from nanoflow.engine.grammar import GrammarCompiler, constrain
from nanoflow.engine.sampling_params import SamplingParams
from nanoflow.engine.tokenizer import decode, load_tokenizer
from nanoflow.errors import RequestError
from nanoflow.models.loader import resolve_model

logger = logging.getLogger(__name__)


@dataclass
class CompletionOutput:
    text: str
    token_ids: list[int]
    finish_reason: str | None
    logprobs: list[float] = field(default_factory=list)


@dataclass
class GenerationOutput:
    """One prompt's results: ``n`` completions and the request's timings (seconds)."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    metrics: dict[str, float]


class LLM:
    """An engine plus a tokenizer, for batch generation in-process."""

    def __init__(self, model: str = "builtin", **engine_kwargs: Any) -> None:
        self.config = EngineConfig(model=model, **engine_kwargs)
        _, checkpoint = resolve_model(model)
        self.tokenizer = load_tokenizer(self.config.tokenizer or checkpoint)
        detok = (lambda ids: decode(self.tokenizer, ids)) if self.tokenizer else None
        self.engine = EngineCore(self.config, detokenize=detok)
        if self.tokenizer is not None and self.tokenizer.eos_token_id is not None:
            self.engine.eos_token_ids.add(self.tokenizer.eos_token_id)
        self._ids = itertools.count()
        self.grammars = GrammarCompiler(
            self.tokenizer, self.engine.spec.vocab_size, sorted(self.engine.eos_token_ids)
        )

    def encode(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise RequestError("this model has no tokenizer: pass token ids instead of text")
            return self.tokenizer.encode(prompt)
        return list(prompt)

    def generate(
        self,
        prompts: str | list[str] | list[list[int]],
        sampling_params: SamplingParams | list[SamplingParams] | None = None,
        use_tqdm: bool = True,
    ) -> list[GenerationOutput]:
        """Run every prompt to completion; a request that fails validation raises before any
        work starts, so one bad prompt never half-runs a batch."""
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]  # type: ignore[list-item]
        params = sampling_params or SamplingParams()
        params_list = params if isinstance(params, list) else [params] * len(prompts)
        if len(params_list) != len(prompts):
            raise RequestError("give one SamplingParams, or one per prompt")
        encoded = [self.encode(p) for p in prompts]
        for ids, p in zip(encoded, params_list, strict=True):
            p.validate()
            if p.structured is not None:
                self.grammars.compile(p.structured)  # a bad constraint fails before any work
            if not ids:
                raise RequestError("a prompt is empty")
            if len(ids) + p.max_tokens > self.engine.max_model_len:
                raise RequestError(
                    f"a prompt of {len(ids)} tokens + max_tokens {p.max_tokens} exceeds the "
                    f"context of {self.engine.max_model_len}"
                )
        groups: list[tuple[str, list[str]]] = []
        for prompt_ids, p in zip(encoded, params_list, strict=True):
            rid = f"gen-{next(self._ids)}"
            members = []
            for k in range(p.n):
                member = SamplingParams(**{**p.__dict__, "n": 1})
                if p.seed is not None:
                    member.seed = p.seed + k
                grammar = self.grammars.matcher(p.structured) if p.structured else None
                seq = self.engine.add_request(f"{rid}-{k}", prompt_ids, member)
                if grammar is not None:
                    constrain(seq, grammar)
                members.append(f"{rid}-{k}")
            groups.append((rid, members))
        finished = self._run(sum(p.n for p in params_list), use_tqdm)
        results = []
        for (rid, members), prompt, ids in zip(groups, prompts, encoded, strict=True):
            seqs = [finished[m] for m in members]
            results.append(
                GenerationOutput(
                    request_id=rid,
                    prompt=prompt if isinstance(prompt, str) else None,
                    prompt_token_ids=ids,
                    outputs=[self._completion(s) for s in seqs],
                    metrics=_metrics(seqs[0]),
                )
            )
        return results

    def _run(self, total: int, use_tqdm: bool) -> dict[str, Any]:
        finished: dict[str, Any] = {}
        seqs = {s.request_id: s for s in self.engine.scheduler.waiting}
        with tqdm(total=total, desc="generate", disable=not use_tqdm, unit="req") as bar:
            while self.engine.has_unfinished:
                for out in self.engine.step():
                    if out.error:
                        raise RuntimeError(f"request {out.request_id} failed: {out.error}")
                    if out.finished:
                        finished[out.request_id] = seqs[out.request_id]
                        bar.update(1)
        return finished

    def _completion(self, seq: Any) -> CompletionOutput:
        text = decode(self.tokenizer, seq.output_token_ids) if self.tokenizer else ""
        if seq.stop_text_len is not None:
            text = text[: seq.stop_text_len]
        return CompletionOutput(
            text, list(seq.output_token_ids), seq.finish_reason, list(seq.output_logprobs)
        )


def _metrics(seq: Any) -> dict[str, float]:
    out = {
        "num_preemptions": float(seq.num_preemptions),
        "num_cached_tokens": float(seq.num_cached_tokens),
    }
    if seq.first_token_time is not None:
        out["ttft_s"] = seq.first_token_time - seq.arrival_time
    if seq.finish_time is not None:
        out["latency_s"] = seq.finish_time - seq.arrival_time
    return out
