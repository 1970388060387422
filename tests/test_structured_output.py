"""Grammar-constrained decoding on the builtin model: whatever its random weights prefer, the
output parses and validates against the schema (or matches the regex / grammar)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest

from nanoflow import LLM, SamplingParams
from nanoflow.engine.grammar import GrammarCompiler, choice_grammar, constrain
from nanoflow.engine.sampling_params import StructuredOutput
from nanoflow.engine.tokenizer import decode
from nanoflow.errors import RequestError

MAX_TOKENS = 200

WORD = {"type": "string", "maxLength": 6}
SMALL = {"type": "integer", "minimum": 0, "maximum": 99}
DIGIT = {"minimum": 0, "maximum": 9}
SCHEMAS = [
    {"type": "boolean"},
    {"type": "null"},
    SMALL,
    {"type": "integer", "minimum": -5, "maximum": 5},
    {"enum": ["red", "green", "blue"]},
    {"const": "fixed"},
    WORD,
    {"type": "string", "pattern": "^[a-c]{2,4}$"},
    {"type": "array", "items": {"type": "boolean"}, "maxItems": 3},
    {"type": "array", "items": SMALL, "minItems": 1, "maxItems": 3},
    {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]},
    {"type": "object", "properties": {"n": SMALL, "s": WORD}, "required": ["n", "s"]},
    {
        "type": "object",
        "properties": {"tag": {"enum": ["a", "b"]}, "flag": {"type": "boolean"}},
        "required": ["tag", "flag"],
        "additionalProperties": False,
    },
    {
        "type": "object",
        "properties": {"inner": {"type": "object", "properties": {"x": SMALL}, "required": ["x"]}},
        "required": ["inner"],
    },
    {
        "type": "object",
        "properties": {"items": {"type": "array", "items": WORD, "maxItems": 2}},
        "required": ["items"],
    },
    {"anyOf": [{"type": "boolean"}, SMALL]},
    {"type": "array", "prefixItems": [{"type": "boolean"}, SMALL], "items": False},
    {"type": "object", "properties": {"v": {"type": ["integer", "null"], **DIGIT}}},
    {
        "type": "object",
        "properties": {"name": WORD, "age": SMALL, "admin": {"type": "boolean"}},
        "required": ["name", "age", "admin"],
    },
    {"type": "array", "items": {"enum": [1, 2, 3]}, "minItems": 2, "maxItems": 2},
]


@pytest.fixture(scope="module")
def llm():
    return LLM("builtin", max_model_len=256)


@pytest.fixture(scope="module")
def compiler(llm):
    tokenizer = llm.tokenizer
    return GrammarCompiler(tokenizer, llm.engine.spec.vocab_size, sorted(llm.engine.eos_token_ids))


def run(llm, compiler, spec: StructuredOutput, params: SamplingParams) -> tuple[str, str]:
    """Text and finish reason of one constrained request run to completion on the engine."""
    engine = llm.engine
    seq = engine.add_request(f"r{id(params)}", [5, 6, 7], params)
    constrain(seq, compiler.matcher(spec))
    while engine.has_unfinished:
        engine.step()
    return decode(llm.tokenizer, seq.output_token_ids), seq.finish_reason


@pytest.mark.parametrize("sampled", [False, True], ids=["greedy", "sampled"])
def test_twenty_schemas_give_valid_json(llm, compiler, sampled):
    assert len({json.dumps(s, sort_keys=True) for s in SCHEMAS}) == 20
    for i, schema in enumerate(SCHEMAS):
        temperature = 1.0 if sampled else 0.0
        params = SamplingParams(max_tokens=MAX_TOKENS, temperature=temperature, seed=i)
        text, reason = run(
            llm, compiler, StructuredOutput("json_schema", json.dumps(schema)), params
        )
        assert reason == "stop", (schema, text)
        jsonschema.validate(json.loads(text), schema)


def test_regex_grammar_and_choice(llm, compiler):
    params = SamplingParams(max_tokens=40, temperature=1.0, seed=1)
    text, _ = run(llm, compiler, StructuredOutput("regex", r"[0-9]{3}-[a-z]{2}"), params)
    assert re.fullmatch(r"[0-9]{3}-[a-z]{2}", text)
    spec = StructuredOutput("grammar", choice_grammar(["yes", "no", "maybe"]))
    text, _ = run(llm, compiler, spec, SamplingParams(max_tokens=20, temperature=1.0, seed=2))
    assert text in ("yes", "no", "maybe")


def test_a_bad_schema_is_a_request_error(compiler):
    with pytest.raises(RequestError, match="cannot compile the json_schema constraint"):
        compiler.matcher(StructuredOutput("json_schema", '{"type": "bogus"}'))
    with pytest.raises(RequestError, match="regex"):
        compiler.matcher(StructuredOutput("regex", "("))
    # a grammar of non-ASCII text, as a fuzzer sent it: xgrammar's own error message about it
    # is not valid UTF-8, which once escaped as UnicodeDecodeError and stopped the engine loop
    with pytest.raises(RequestError, match="cannot compile the grammar constraint"):
        compiler.matcher(StructuredOutput("grammar", "\U00021310\x98\xec\f\x9c\x8e}y\x8fmTI"))


def test_after_the_grammar_ends_only_its_stop_tokens_follow(llm, compiler):
    params = SamplingParams(max_tokens=12, temperature=1.0, seed=5, ignore_eos=True)
    spec = StructuredOutput("json_schema", '{"type": "boolean"}')
    text, reason = run(llm, compiler, spec, params)
    assert reason == "length" and json.loads(text) in (True, False)


def test_cost_script_dry_run(tmp_path):
    script = Path(__file__).resolve().parents[1] / "experiments" / "structured_output_cost.py"
    cmd = [sys.executable, str(script), "--dry-run", "--out", str(tmp_path)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    (path,) = tmp_path.glob("cpu/structured_output/*.json")
    record = json.loads(path.read_text())
    for mode in ("unconstrained", "constrained"):
        assert record[mode]["decode_tokens"] > 0 and record[mode]["ms_per_token"] > 0
    assert "overhead_per_token" in record and record["command"] and record["date"]


def test_offline_generate_honours_the_constraint(llm):
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]}
    spec = StructuredOutput("json_schema", json.dumps(schema))
    params = SamplingParams(max_tokens=60, temperature=1.0, seed=3, n=2, structured=spec)
    (out,) = llm.generate(["Hello"], params, use_tqdm=False)
    for choice in out.outputs:
        jsonschema.validate(json.loads(choice.text), schema)
    with pytest.raises(RequestError, match="cannot compile"):
        llm.generate(["x"], SamplingParams(structured=StructuredOutput("regex", "(")))


@pytest.fixture
def dirty_allocations(monkeypatch):
    """``torch.empty`` returning memory full of set bits and cleared ones, as reused memory
    may be: a row the fill leaves unwritten shows."""
    import torch

    empty = torch.empty

    def dirty(*args, **kwargs):
        out = empty(*args, **kwargs)
        return out.fill_(0x0F0F0F0F) if out.dtype == torch.int32 else out

    monkeypatch.setattr(torch, "empty", dirty)


def test_batched_bitmask_matches_one_fill_per_row(llm, compiler, dirty_allocations):
    import torch
    import xgrammar

    from nanoflow.engine.grammar import token_bitmask

    done = compiler.matcher(StructuredOutput("regex", "a"))
    for token in llm.tokenizer.encode("a", add_special_tokens=False) + compiler.stop_token_ids[:1]:
        done.accept_token(token)
    assert done.is_terminated()
    grammars = [
        compiler.matcher(StructuredOutput("json")),
        done,
        compiler.matcher(StructuredOutput("regex", "[0-9]+")),
    ]
    vocab = llm.engine.spec.vocab_size
    rows = {0: grammars[0], 1: grammars[1], 3: grammars[2]}  # row 2 is unconstrained
    expected = xgrammar.allocate_token_bitmask(4, vocab)
    for row, grammar in rows.items():
        grammar.fill_next_token_bitmask(expected, row)
    assert torch.equal(token_bitmask(rows, 4, vocab), expected)
    assert torch.all(expected[2] == -1)


def test_deferred_token_is_accepted_once_when_the_grammar_is_next_asked(llm, compiler):
    from nanoflow.engine.grammar import catch_up_all

    grammar = compiler.matcher(StructuredOutput("regex", "ab"))
    a, b = (llm.tokenizer.encode(t, add_special_tokens=False)[0] for t in "ab")
    reads = []

    def step(tokens):
        return lambda: reads.append(tokens) or tokens

    grammar.defer(step([7, a]), 1)
    assert reads == []  # nothing is read until the grammar is asked
    grammar.defer(step([b]), 0)  # a new token first takes the one before
    assert reads == [[7, a]]
    catch_up_all([grammar])
    catch_up_all([grammar])
    assert reads == [[7, a], [b]]
    grammar.accept_token(compiler.stop_token_ids[0])
    assert grammar.is_terminated()


def _cost_script():
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "experiments"))
    import structured_output_cost

    return structured_output_cost


TOKENS = [b"<s>", b"</s>", b"[", b"]", b'"', b'",', b"ab", b" c", b"\xe2\x82", b"\\n"]


def _write_vocab(folder: Path, kind: str) -> Path:
    import base64

    encoded = [base64.b64encode(t).decode() for t in TOKENS]
    if kind == "tiktoken":  # ranks out of line order, as nothing promises the order
        path = folder / "tokenizer.model"
        lines = [f"{encoded[i]} {i}" for i in reversed(range(len(TOKENS)))]
        path.write_text("\n".join(lines) + "\n")
        return path
    path = folder / "tekken.json"
    vocab = [{"rank": i, "token_bytes": e} for i, e in enumerate(encoded[2:])]
    path.write_text(json.dumps({"config": {"default_num_special_tokens": 2}, "vocab": vocab}))
    return path


@pytest.mark.parametrize("kind", ["tiktoken", "tekken"])
def test_cost_script_reads_vocabulary_files(tmp_path, kind):
    script = _cost_script()
    tokens = script.file_vocabulary(_write_vocab(tmp_path, kind))
    if kind == "tiktoken":
        assert tokens == TOKENS
    else:  # the special tokens are placeholders, the rest the file's bytes in rank order
        assert tokens[2:] == TOKENS[2:] and tokens[:2] == [b"<SPECIAL_0>", b"<SPECIAL_1>"]
    with pytest.raises(SystemExit, match="fewer than"):
        script.file_info(_write_vocab(tmp_path, kind), len(TOKENS) + 1, [1])


def test_a_vocabulary_file_constrains_like_a_tokenizer(tmp_path):
    import torch
    import xgrammar

    script = _cost_script()
    vocab = len(TOKENS) - 2  # cut below the file's size: the last two tokens are not the model's
    info = script.file_info(_write_vocab(tmp_path, "tiktoken"), vocab, [1])
    compiler = GrammarCompiler(None, vocab, [1], tokenizer_info=info)
    schema = json.dumps({"type": "array", "items": {"type": "string"}})
    grammar = compiler.matcher(StructuredOutput("json_schema", schema))
    bitmask = torch.full(xgrammar.get_bitmask_shape(1, vocab), -1, dtype=torch.int32)
    grammar.fill_next_token_bitmask(bitmask, 0)
    allowed = {TOKENS[i] for i in range(vocab) if bitmask[0, i // 32] >> (i % 32) & 1}
    assert allowed == {b"["}


def test_a_ragged_vocabulary_bitmask_matches_one_fill_per_row(tmp_path, dirty_allocations):
    import torch
    import xgrammar

    from nanoflow.engine.grammar import token_bitmask

    vocab = len(TOKENS)  # not a multiple of 32: the last word of a row is partly padding
    info = _cost_script().file_info(_write_vocab(tmp_path, "tiktoken"), vocab, [1])
    compiler = GrammarCompiler(None, vocab, [1], tokenizer_info=info)
    schema = StructuredOutput("json_schema", json.dumps({"type": "array"}))
    rows = {0: compiler.matcher(schema), 2: compiler.matcher(schema)}
    expected = xgrammar.allocate_token_bitmask(3, vocab)
    for row, grammar in rows.items():
        grammar.fill_next_token_bitmask(expected, row)
    assert torch.equal(token_bitmask(rows, 3, vocab), expected)


def test_fill_threads_from_the_environment(monkeypatch):
    from nanoflow.engine.grammar import THREADS_ENV, fill_threads

    monkeypatch.delenv(THREADS_ENV, raising=False)
    assert fill_threads() >= 1
    monkeypatch.setenv(THREADS_ENV, "3")
    assert fill_threads() == 3
    for bad in ("0", "-2", "many"):
        monkeypatch.setenv(THREADS_ENV, bad)
        with pytest.raises(ValueError, match=THREADS_ENV):
            fill_threads()


def test_fill_scaling_script_checks_every_strategy_against_the_per_row_fill(tmp_path):
    script = Path(__file__).resolve().parents[1] / "experiments" / "grammar_fill_scaling.py"
    vocab = _write_vocab(tmp_path, "tekken")
    cmd = [sys.executable, str(script), "--vocab-file", str(vocab), "--vocab-size", "10",
           "--batch", "6", "--steps", "3", "--threads", "1,2", "--out", str(tmp_path)]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    (path,) = tmp_path.glob("cpu/grammar_fill/*.json")
    record = json.loads(path.read_text())
    assert record["mismatched_fills"] == 0 and record["host_cpus"] >= 1
    assert set(record["ms_median"]) == {"rows", "xgrammar[1]", "xgrammar[2]", "slices[2]", "accept"}
