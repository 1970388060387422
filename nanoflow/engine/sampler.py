"""Token sampling on the device: greedy, temperature, top-k, top-p, per-request seeds.

Everything stays on the GPU (no host sync), so the next iteration can be launched before the host
has read these tokens. Non-greedy rows are filtered in one batched pass and sampled with the
exponential-race trick (argmax of p / E, E ~ Exp(1)); seeded requests draw E from their own
generator, so a seed gives the same text whatever else shares the batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from nanoflow.engine.sequence import Sequence
from nanoflow.engine.upload import to_device


@dataclass
class DeviceSample:
    token_ids: torch.Tensor  # [rows] int64, on the logits' device
    logprobs: torch.Tensor | None  # [rows] float32 log-probability of each token, if asked


def _filtered_probs(logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
    device = logits.device
    temps = to_device([s.params.temperature for s in seqs], torch.float32, device).unsqueeze(1)
    top_k = to_device([s.params.top_k or logits.shape[1] for s in seqs], torch.int64, device)
    top_p = to_device([s.params.top_p for s in seqs], torch.float32, device).unsqueeze(1)
    sorted_logits, order = torch.sort(logits / temps, dim=-1, descending=True)
    ranks = torch.arange(logits.shape[1], device=device).unsqueeze(0)
    sorted_logits = sorted_logits.masked_fill(ranks >= top_k.unsqueeze(1), float("-inf"))
    probs = torch.softmax(sorted_logits, dim=-1)
    mass_before = probs.cumsum(-1) - probs
    probs = probs.masked_fill(mass_before >= top_p, 0.0)
    return torch.zeros_like(probs).scatter_(-1, order, probs)


def sample(logits: torch.Tensor, seqs: list[Sequence]) -> DeviceSample:
    """One token per row of float32 ``logits`` ([rows, vocab]) under each row's params."""
    tokens = torch.argmax(logits, dim=-1)
    random_rows = [i for i, s in enumerate(seqs) if not s.params.greedy]
    if random_rows:
        index = to_device(random_rows, torch.int64, logits.device)
        probs = _filtered_probs(logits[index], [seqs[i] for i in random_rows])
        race = torch.empty_like(probs).exponential_()
        for j, i in enumerate(random_rows):
            gen = seqs[i].generator_on(logits.device)
            if gen is not None:
                race[j].exponential_(generator=gen)
        tokens[index] = torch.argmax(probs / race, dim=-1)
    logprobs = None
    if any(s.params.logprobs is not None for s in seqs):
        chosen = torch.log_softmax(logits, dim=-1).gather(1, tokens.unsqueeze(1))
        logprobs = chosen.squeeze(1)
    return DeviceSample(tokens, logprobs)
