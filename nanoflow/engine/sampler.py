"""Token sampling: greedy, temperature, top-k, top-p, and per-request seeds."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from nanoflow.engine.sequence import Sequence


@dataclass
class SampleResult:
    token_ids: list[int]
    logprobs: list[float]


def _filter_top_k_top_p(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    if top_k > 0 and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        cumulative = torch.softmax(sorted_logits, dim=-1).cumsum(-1)
        drop = cumulative - torch.softmax(sorted_logits, dim=-1) >= top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    return logits


def sample(logits: torch.Tensor, seqs: list[Sequence]) -> SampleResult:
    """One token per row of float32 ``logits`` ([num_seqs, vocab]) under each row's params.

    Greedy rows are one batched argmax; the others sample row by row from their own generator
    (seeded requests) so a seed gives the same text whatever else is in the batch.
    """
    tokens = torch.argmax(logits, dim=-1)
    need_logprobs = any(s.params.logprobs is not None for s in seqs)
    for i, seq in enumerate(seqs):
        p = seq.params
        if p.greedy:
            continue
        row = _filter_top_k_top_p(logits[i] / p.temperature, p.top_k, p.top_p)
        probs = torch.softmax(row, dim=-1)
        if seq.generator is not None:
            probs = probs.cpu()
        tokens[i] = torch.multinomial(probs, 1, generator=seq.generator).to(tokens.device)[0]
    token_list = tokens.tolist()
    logprobs: list[float] = []
    if need_logprobs:
        chosen = torch.log_softmax(logits, dim=-1).gather(1, tokens.unsqueeze(1)).squeeze(1)
        logprobs = chosen.tolist()
    return SampleResult(token_list, logprobs)
