"""Token sampling on the device: logit processing, then greedy, temperature, top-k, top-p and
per-request seeds, then the log-probabilities asked for.

Everything stays on the GPU (no host sync), so the next iteration can be launched before the host
has read these tokens. Processing is batched over the rows that ask for it: ``logit_bias`` as one
indexed add, presence / frequency / repetition penalties from per-sequence token counts kept on the
device, ``min_tokens`` as a mask of the ending tokens, and grammar constraints as xgrammar token
bitmasks. A grammar needs the sampled token on the host to advance: it reads it at the next
step, once that step's forward pass is queued, and the runner fills the masks on a host thread
(``masked_sampling``), so neither the wait nor the fill holds up the GPU. Non-greedy rows are
filtered in one batched pass (the top-k / top-p sort only when a row asks for it) and sampled
with the exponential-race trick (argmax of p / E, E ~ Exp(1)); E is drawn when the step is
launched, before its logits are processed, and a seeded request's E is a hash of its seed and
the token's index, so a seed gives the same text whatever else shares the batch.
Reported log-probabilities are those of the processed logits (before temperature), so a masked
token never appears among the alternatives; a prompt's tokens are scored under the model's own
logits, as no request rule applies to them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from nanoflow.engine.sequence import Sequence
from nanoflow.engine.upload import to_device, upload
from nanoflow.kernels import seeded_exponential
from nanoflow.kernels.seeded_noise import noise_keys_batch


@dataclass
class DeviceSample:
    token_ids: torch.Tensor  # [rows] int64, on the logits' device
    logprobs: torch.Tensor | None  # [rows] float32 log-probability of each token, if asked
    top_ids: torch.Tensor | None = None  # [rows, k] the k most likely tokens, if asked
    top_logprobs: torch.Tensor | None = None  # [rows, k] their log-probabilities


@dataclass
class SamplerState:
    """What the sampler keeps for one sequence across iterations."""

    banned_until_min: tuple[int, ...] = ()  # ending tokens masked until min_tokens
    output_counts: torch.Tensor | None = None  # [vocab] float32 occurrences in the output
    prompt_mask: torch.Tensor | None = None  # [vocab] bool, tokens of the prompt
    grammar: Any = None  # an engine.grammar.Grammar constraining the output


def state_of(seq: Sequence) -> SamplerState:
    if seq.sampler_state is None:
        seq.sampler_state = SamplerState()
    return seq.sampler_state


def _add_bias(logits: torch.Tensor, seqs: list[Sequence]) -> None:
    rows, cols, values = [], [], []
    for i, seq in enumerate(seqs):
        for token, bias in seq.params.logit_bias.items():
            rows.append(i)
            cols.append(token)
            values.append(bias)
    if rows:
        index = (
            to_device(rows, torch.int64, logits.device),
            to_device(cols, torch.int64, logits.device),
        )
        logits.index_put_(index, to_device(values, torch.float32, logits.device), accumulate=True)


def _counts(seq: Sequence, vocab: int, device: torch.device) -> torch.Tensor:
    state = state_of(seq)
    if state.output_counts is None:
        state.output_counts = torch.zeros(vocab, dtype=torch.float32, device=device)
        mask = torch.zeros(vocab, dtype=torch.bool, device=device)
        mask[to_device(seq.prompt_token_ids, torch.int64, device)] = True
        state.prompt_mask = mask
    return state.output_counts


def _penalize(logits: torch.Tensor, seqs: list[Sequence], rows: list[int]) -> None:
    """OpenAI's presence / frequency penalties and the CTRL repetition penalty, in one pass."""
    device, vocab = logits.device, logits.shape[1]
    chosen = [seqs[i] for i in rows]
    counts = torch.stack([_counts(s, vocab, device) for s in chosen])
    seen_in_prompt = torch.stack([state_of(s).prompt_mask for s in chosen])

    def column(name: str) -> torch.Tensor:
        return to_device([getattr(s.params, name) for s in chosen], torch.float32, device)[:, None]

    index = to_device(rows, torch.int64, device)
    sub = logits[index]
    repetition = column("repetition_penalty")
    seen = (counts > 0) | seen_in_prompt
    sub = torch.where(seen, torch.where(sub > 0, sub / repetition, sub * repetition), sub)
    sub -= column("frequency_penalty") * counts + column("presence_penalty") * (counts > 0)
    logits[index] = sub


def _ban_endings(logits: torch.Tensor, seqs: list[Sequence]) -> None:
    rows, cols = [], []
    for i, seq in enumerate(seqs):
        state = seq.sampler_state
        if state is not None and len(seq.output_token_ids) < seq.params.min_tokens:
            rows += [i] * len(state.banned_until_min)
            cols += state.banned_until_min
    if rows:
        index = (
            to_device(rows, torch.int64, logits.device),
            to_device(cols, torch.int64, logits.device),
        )
        logits.index_put_(index, torch.tensor(float("-inf"), device=logits.device))


def _constrain(
    logits: torch.Tensor, rows: list[int], seqs: list[Sequence], bitmask: torch.Tensor | None
) -> None:
    """Mask each constrained row to its grammar's next tokens: ``bitmask`` when the caller
    filled it (``masked_sampling``), else filled here."""
    import xgrammar

    from nanoflow.engine.grammar import token_bitmask

    if bitmask is None:
        grammars = {i: state_of(seqs[i]).grammar for i in rows}
        bitmask = token_bitmask(grammars, logits.shape[0], logits.shape[1], pinned=logits.is_cuda)
    bitmask = bitmask.to(logits.device, non_blocking=True)
    # every row (unconstrained rows allow all): row indices would be a pageable upload, which
    # can stall the host until the GPU reaches it
    xgrammar.apply_token_bitmask_inplace(logits, bitmask)


def process_logits(
    logits: torch.Tensor,
    seqs: list[Sequence],
    bitmask: torch.Tensor | None = None,
    in_place: bool = False,
) -> torch.Tensor:
    """The logits the request's rules leave (a new tensor when any rule applies, unless
    ``in_place``: a caller done with ``logits`` spares the copy of the whole batch's);
    ``bitmask``: the constrained rows' token masks, if already filled (one row per row of
    ``logits``)."""
    penalized = [i for i, s in enumerate(seqs) if s.params.has_penalties]
    constrained = [i for i, s in enumerate(seqs) if grammar_of(s) is not None]
    banning = any(s.params.min_tokens for s in seqs)
    if not (penalized or constrained or banning or any(s.params.logit_bias for s in seqs)):
        return logits
    if not in_place:
        logits = logits.clone()
    _add_bias(logits, seqs)
    if penalized:
        _penalize(logits, seqs, penalized)
    if banning:
        _ban_endings(logits, seqs)
    if constrained:
        _constrain(logits, constrained, seqs, bitmask)
    return logits


def grammar_of(seq: Sequence) -> Any:
    """The grammar constraining ``seq``'s output, if any."""
    return None if seq.sampler_state is None else seq.sampler_state.grammar


def _filtered_probs(logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
    """Temperature, then top-k and top-p where a row asks for them: the sort they need (the
    largest part of sampling at a full vocabulary) is skipped when no row does."""
    device, vocab = logits.device, logits.shape[1]
    temps = to_device([s.params.temperature for s in seqs], torch.float32, device).unsqueeze(1)
    if all(s.params.top_p >= 1.0 and s.params.top_k in (0, vocab) for s in seqs):
        return torch.softmax(logits / temps, dim=-1)
    top_k = to_device([s.params.top_k or vocab for s in seqs], torch.int64, device)
    top_p = to_device([s.params.top_p for s in seqs], torch.float32, device).unsqueeze(1)
    sorted_logits, order = torch.sort(logits / temps, dim=-1, descending=True)
    ranks = torch.arange(vocab, device=device).unsqueeze(0)
    sorted_logits = sorted_logits.masked_fill(ranks >= top_k.unsqueeze(1), float("-inf"))
    probs = torch.softmax(sorted_logits, dim=-1)
    mass_before = probs.cumsum(-1) - probs
    probs = probs.masked_fill(mass_before >= top_p, 0.0)
    return torch.zeros_like(probs).scatter_(-1, order, probs)


@dataclass
class SamplingNoise:
    """The exponential race's draws for a step's random rows, drawn before its logits are
    ready (they do not depend on them), so a step that waits for grammar masks has them."""

    rows: list[int]
    index: torch.Tensor | None  # the rows, on the device
    race: torch.Tensor | None  # [len(rows), vocab] Exp(1) draws


def sampling_noise(shape: torch.Size, seqs: list[Sequence], device: torch.device) -> SamplingNoise:
    """Draws for each non-greedy row of a ``shape`` ([rows, vocab]) step: a seeded request's
    from its seed and the index of the token it samples (``seeded_exponential``, every seeded
    row in one launch), the others' from the device's generator."""
    rows = [i for i, s in enumerate(seqs) if not s.params.greedy]
    if not rows:
        return SamplingNoise(rows, None, None)
    seeded = [(j, seqs[i]) for j, i in enumerate(rows) if seqs[i].params.seed is not None]
    seeds = [seq.params.seed for _, seq in seeded]
    keys = noise_keys_batch(seeds, [len(seq.output_token_ids) for _, seq in seeded])
    if len(seeded) == len(rows):
        race = seeded_exponential(upload(keys, device), shape[1])
    else:
        race = torch.empty(len(rows), shape[1], device=device).exponential_()
        if seeded:
            at = to_device([j for j, _ in seeded], torch.int64, device)
            race[at] = seeded_exponential(upload(keys, device), shape[1])
    return SamplingNoise(rows, to_device(rows, torch.int64, device), race)


def _record(tokens: torch.Tensor, seqs: list[Sequence]) -> None:
    """Count each penalized row's token on the device (grammars take theirs later, through
    ``defer_grammar_tokens``, so sampling never waits for the GPU)."""
    one = None
    for i, seq in enumerate(seqs):
        state = seq.sampler_state
        if state is not None and state.output_counts is not None:
            one = torch.ones(1, device=tokens.device) if one is None else one
            state.output_counts.index_add_(0, tokens[i : i + 1], one)


def defer_grammar_tokens(seqs: list[Sequence], tokens_of: Callable[[], list[int]]) -> None:
    """Hand each constrained row's sampled token to its grammar as a reader (``tokens_of()``
    gives the step's tokens once they are on the host); the grammar reads it when next asked."""
    for i, seq in enumerate(seqs):
        grammar = grammar_of(seq)
        if grammar is not None:
            grammar.defer(tokens_of, i)


def sample(
    logits: torch.Tensor,
    seqs: list[Sequence],
    bitmask: torch.Tensor | None = None,
    noise: SamplingNoise | None = None,
    in_place: bool = False,
) -> DeviceSample:
    """One token per row of float32 ``logits`` ([rows, vocab]) under each row's params
    (``bitmask``, ``in_place``: as for ``process_logits``; ``noise``: the step's
    ``sampling_noise`` if drawn already)."""
    if noise is None:
        noise = sampling_noise(logits.shape, seqs, logits.device)
    logits = process_logits(logits, seqs, bitmask, in_place)
    tokens = torch.argmax(logits, dim=-1)
    if noise.rows:
        probs = _filtered_probs(logits[noise.index], [seqs[i] for i in noise.rows])
        tokens[noise.index] = torch.argmax(probs / noise.race, dim=-1)
    _record(tokens, seqs)
    result = DeviceSample(tokens, None)
    if any(s.params.logprobs is not None for s in seqs):
        all_logprobs = torch.log_softmax(logits, dim=-1)
        result.logprobs = all_logprobs.gather(1, tokens.unsqueeze(1)).squeeze(1)
        k = max(s.params.logprobs or 0 for s in seqs)
        if k:
            result.top_logprobs, result.top_ids = all_logprobs.topk(k, dim=-1)
    return result


def score_prompt(logits: torch.Tensor, scored: list[tuple[Sequence, int]]) -> DeviceSample:
    """Per row of ``logits``, the log-probability of the prompt token it predicts (``scored``:
    the sequence and the token's position) and the k most likely tokens, k the largest
    ``prompt_logprobs`` asked."""
    targets = [seq.prompt_token_ids[position] for seq, position in scored]
    token_ids = to_device(targets, torch.int64, logits.device)
    all_logprobs = torch.log_softmax(logits, dim=-1)
    result = DeviceSample(token_ids, all_logprobs.gather(1, token_ids.unsqueeze(1)).squeeze(1))
    k = max(seq.params.prompt_logprobs for seq, _ in scored)
    if k:
        result.top_logprobs, result.top_ids = all_logprobs.topk(k, dim=-1)
    return result
