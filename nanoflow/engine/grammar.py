"""Grammar-constrained decoding: a request's structured-output spec compiled by xgrammar into a
matcher that the sampler asks for each step's allowed tokens and then advances.

xgrammar is used because it compiles JSON schemas, regexes and EBNF against the tokenizer's
vocabulary once, caches them, and fills the token bitmasks of a batch in native code.
"""

from __future__ import annotations

import json
import re
from typing import Any

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
    tokens may follow (a request that ignores EOS keeps generating them)."""

    def __init__(self, matcher: Any, stop_token_ids: list[int]) -> None:
        self.matcher, self.stop_token_ids = matcher, stop_token_ids

    def is_terminated(self) -> bool:
        return self.matcher.is_terminated()

    def fill_next_token_bitmask(self, bitmask: Any, row: int) -> None:
        if self.is_terminated():
            bitmask[row] = 0
            for token in self.stop_token_ids:
                bitmask[row, token // 32] |= 1 << (token % 32)
        else:
            self.matcher.fill_next_token_bitmask(bitmask, row)

    def accept_token(self, token: int) -> None:
        if not self.is_terminated():
            self.matcher.accept_token(token)


_batch_matcher: Any = None


def token_bitmask(grammars: list[Grammar], vocab_size: int) -> Any:
    """The allowed tokens of each grammar's next step, one bitmask row each; the live grammars
    are filled together by xgrammar's batch matcher (native threads), not one call per row."""
    global _batch_matcher
    import xgrammar

    bitmask = xgrammar.allocate_token_bitmask(len(grammars), vocab_size)
    live = []
    for row, grammar in enumerate(grammars):
        if grammar.is_terminated():
            grammar.fill_next_token_bitmask(bitmask, row)
        else:
            live.append(row)
    if live:
        if _batch_matcher is None:
            _batch_matcher = xgrammar.BatchGrammarMatcher()
        matchers = [grammars[row].matcher for row in live]
        _batch_matcher.batch_fill_next_token_bitmask(matchers, bitmask, indices=live)
    return bitmask


def constrain(seq: Sequence, grammar: Grammar) -> None:
    """Make the sampler keep ``seq``'s output inside ``grammar``."""
    state_of(seq).grammar = grammar


def choice_grammar(choices: list[str]) -> str:
    """EBNF accepting exactly one of ``choices`` (vLLM's guided_choice)."""
    return "root ::= " + " | ".join(json.dumps(c, ensure_ascii=False) for c in choices)
