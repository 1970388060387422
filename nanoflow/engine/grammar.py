"""Grammar-constrained decoding: a request's structured-output spec compiled by xgrammar into a
matcher that the sampler asks for each step's allowed tokens and then advances.

xgrammar is used because it compiles JSON schemas, regexes and EBNF against the tokenizer's
vocabulary once, caches them, and fills the token bitmasks of a batch in native code.
"""

from __future__ import annotations

import functools
import json
import os
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from nanoflow.engine.sampler import state_of
from nanoflow.engine.sampling_params import StructuredOutput
from nanoflow.engine.sequence import Sequence
from nanoflow.errors import RequestError

_LOG_PREFIX = re.compile(r"^\[[^\]]*\] \S+: ")


class GrammarCompiler:
    """Compiles structured-output specs for one tokenizer and model vocabulary; xgrammar is
    loaded with the first constrained request, so engines that never see one do not pay for it."""

    def __init__(
        self,
        tokenizer: Any,
        vocab_size: int,
        stop_token_ids: list[int],
        tokenizer_info: Any = None,
    ) -> None:
        """``tokenizer_info``: an ``xgrammar.TokenizerInfo`` to use instead of the tokenizer's
        (a vocabulary without a Hugging Face tokenizer)."""
        self.tokenizer, self.vocab_size, self.info = tokenizer, vocab_size, tokenizer_info
        self.stop_token_ids = sorted(stop_token_ids)
        self._compiler: Any = None

    @property
    def compiler(self) -> Any:
        if self._compiler is None:
            import xgrammar

            if self.info is None:
                self.info = xgrammar.TokenizerInfo.from_huggingface(
                    self.tokenizer, vocab_size=self.vocab_size
                )
            self._compiler = xgrammar.GrammarCompiler(self.info, max_threads=1)
        return self._compiler

    def compile(self, spec: StructuredOutput) -> Any:
        """The compiled grammar; raises RequestError naming what cannot be compiled."""
        if self.tokenizer is None and self.info is None:
            raise RequestError("structured output needs the model's tokenizer")
        try:
            if spec.kind == "json":
                return self.compiler.compile_builtin_json_grammar()
            if spec.kind == "json_schema":
                return self.compiler.compile_json_schema(spec.spec, any_whitespace=False)
            if spec.kind == "regex":
                return self.compiler.compile_regex(spec.spec)
            return self.compiler.compile_grammar(spec.spec)
        except UnicodeDecodeError:  # xgrammar's message about a non-ASCII spec is not UTF-8
            raise RequestError(f"cannot compile the {spec.kind} constraint") from None
        except (RuntimeError, ValueError) as exc:
            reason = _LOG_PREFIX.sub("", str(exc).strip().splitlines()[0])
            raise RequestError(f"cannot compile the {spec.kind} constraint: {reason}") from None

    def matcher(self, spec: StructuredOutput) -> Grammar:
        import xgrammar

        stops = self.stop_token_ids
        return Grammar(
            xgrammar.GrammarMatcher(self.compile(spec), override_stop_tokens=stops), stops
        )


class Grammar:
    """One request's matcher as the sampler uses it. Once the grammar is complete only its stop
    tokens may follow (a request that ignores EOS keeps generating them).

    A sampled token is accepted late: the sampler leaves a reader of it (``defer``), and the
    next step reads it (``catch_up``) only after that step's forward pass is queued, so the
    GPU runs the next forward while the host waits for the token and fills the next mask.
    """

    def __init__(self, matcher: Any, stop_token_ids: list[int]) -> None:
        self.matcher, self.stop_token_ids = matcher, stop_token_ids
        self.stops = frozenset(stop_token_ids)
        self.finished = False  # the matcher's is_terminated, kept here: it changes on accepts
        self._pending: tuple[Callable[[], list[int]], int] | None = None

    def defer(self, tokens_of: Callable[[], list[int]], row: int) -> None:
        """Accept row ``row`` of the tokens ``tokens_of`` returns (a step's, once on the host)
        when the grammar is next asked anything."""
        self.catch_up()
        self._pending = (tokens_of, row)

    def take_pending(self) -> int | None:
        """The deferred token, read now (None if there is none); the caller accepts it."""
        if self._pending is None:
            return None
        (tokens_of, row), self._pending = self._pending, None
        return tokens_of()[row]

    def catch_up(self) -> None:
        token = self.take_pending()
        if token is not None:
            self.accept_token(token)

    def is_terminated(self) -> bool:
        self.catch_up()
        return self.finished

    def fill_next_token_bitmask(self, bitmask: Any, row: int) -> None:
        if self.is_terminated():
            bitmask[row] = stop_only_row(tuple(self.stop_token_ids), bitmask.shape[1])
        else:
            self.matcher.fill_next_token_bitmask(bitmask, row)

    def accept_token(self, token: int) -> None:
        self.catch_up()
        if not self.finished:
            self.matcher.accept_token(token)
            self.accepted(token)

    def accepted(self, token: int) -> None:
        """Note that the matcher took ``token``: only a stop token can end it."""
        if token in self.stops:
            self.finished = self.matcher.is_terminated()


_batch_matcher: Any = None
THREADS_ENV = "NANOFLOW_GRAMMAR_THREADS"


def fill_threads() -> int:
    """Native threads that fill a step's masks: ``NANOFLOW_GRAMMAR_THREADS``, else every core
    but two (the engine's thread and the CUDA driver's), at least one."""
    value = os.environ.get(THREADS_ENV)
    if value is None:
        return max(1, (os.cpu_count() or 1) - 2)
    if not value.isdigit() or int(value) < 1:
        raise ValueError(f"{THREADS_ENV}={value!r}: expected a positive number of threads")
    return int(value)


def _batch() -> Any:
    """xgrammar's batch matcher, on :func:`fill_threads` threads."""
    global _batch_matcher
    if _batch_matcher is None:
        import xgrammar

        _batch_matcher = xgrammar.BatchGrammarMatcher(fill_threads())
    return _batch_matcher


def catch_up_all(grammars: Iterable[Grammar]) -> None:
    """Accept every grammar's deferred token, the live ones in one native call."""
    live, tokens = [], []
    for grammar in grammars:
        token = grammar.take_pending()
        if token is not None and not grammar.finished:
            live.append(grammar)
            tokens.append(token)
    if live:
        _batch().batch_accept_token([g.matcher for g in live], tokens)
    for grammar, token in zip(live, tokens, strict=True):
        grammar.accepted(token)


@dataclass(frozen=True)
class MaskRows:
    """A step's token masks before the fill: the bitmask with every row final but the live
    ones, and those rows' matchers, in row order."""

    bitmask: torch.Tensor
    live: list[int]
    matchers: list[Any]


@functools.lru_cache(maxsize=64)
def stop_only_row(stop_token_ids: tuple[int, ...], words: int) -> torch.Tensor:
    """A bitmask row allowing only ``stop_token_ids``: what follows a completed grammar (one
    tensor per stop set and width, only ever copied from)."""
    row = np.zeros(words, dtype=np.uint32)
    for token in stop_token_ids:
        row[token // 32] |= np.uint32(1 << (token % 32))
    return torch.from_numpy(row.view(np.int32))


def mask_rows(grammars: dict[int, Grammar], num_rows: int, vocab_size: int, pinned: bool = False
              ) -> MaskRows:  # fmt: skip
    """Catch every grammar up (this waits for the last step's tokens) and lay out the step's
    bitmask of ``num_rows`` rows: unconstrained rows allow all, finished grammars' rows their
    stop tokens, and the live rows are left to :func:`fill_masks`, which writes them whole
    (with a ragged last word they are set too). All of a step's Python work on its masks is
    here, so the thread that fills them runs native code only and never contends for the
    interpreter with the thread that runs the engine. ``pinned``: the bitmask in page-locked
    memory, so its copy to the GPU does not stall the host."""
    import xgrammar

    catch_up_all(grammars.values())
    live, matchers, finished = [], [], []
    for row, grammar in grammars.items():
        if grammar.finished:
            finished.append(row)
        else:
            live.append(row)
            matchers.append(grammar.matcher)
    shape = xgrammar.get_bitmask_shape(num_rows, vocab_size)
    bitmask = torch.empty(shape, dtype=torch.int32, pin_memory=pinned)
    if vocab_size % 32:
        bitmask.fill_(-1)
    else:
        free = sorted(set(range(num_rows)).difference(grammars))
        if free:
            bitmask[torch.tensor(free)] = -1
    by_stops: dict[tuple[int, ...], list[int]] = {}
    for row in finished:
        by_stops.setdefault(tuple(grammars[row].stop_token_ids), []).append(row)
    for stops, rows in by_stops.items():
        bitmask[torch.tensor(rows)] = stop_only_row(stops, shape[1])
    return MaskRows(bitmask, live, matchers)


def fill_masks(rows: MaskRows) -> torch.Tensor:
    """``rows``' bitmask with each live row holding the tokens its grammar allows next, filled
    together by xgrammar's batch matcher (native threads), not one call per row."""
    if rows.live:
        _batch().batch_fill_next_token_bitmask(rows.matchers, rows.bitmask, indices=rows.live)
    return rows.bitmask


def token_bitmask(
    grammars: dict[int, Grammar], num_rows: int, vocab_size: int, pinned: bool = False
) -> torch.Tensor:
    """``grammars``' masks for a step, caught up and filled on the calling thread."""
    return fill_masks(mask_rows(grammars, num_rows, vocab_size, pinned))


def constrain(seq: Sequence, grammar: Grammar) -> None:
    """Make the sampler keep ``seq``'s output inside ``grammar``."""
    state_of(seq).grammar = grammar


def choice_grammar(choices: list[str]) -> str:
    """EBNF accepting exactly one of ``choices`` (vLLM's guided_choice)."""
    return "root ::= " + " | ".join(json.dumps(c, ensure_ascii=False) for c in choices)
