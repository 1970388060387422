"""The OpenAI request fields the server honours, through the official client."""

from __future__ import annotations

import json
import math
import re

import openai
import pytest
from conftest import SERVER_API_KEY

TIMEOUT = 60.0
GREEDY = {"model": "builtin", "temperature": 0.0}


@pytest.fixture(scope="module")
def client(request_server):
    """A client of the session's request server (conftest: builtin, a 256-token context)."""
    return openai.OpenAI(
        base_url=f"{request_server.url}/v1",
        api_key=SERVER_API_KEY,
        timeout=TIMEOUT,
        max_retries=0,
    )


def test_completion_logprobs_are_the_top_k(client):
    out = client.completions.create(prompt="Hello", max_tokens=4, logprobs=3, **GREEDY)
    lp = out.choices[0].logprobs
    for token, chosen, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs, strict=True):
        # k alternatives plus the sampled token; texts of partial characters may coincide
        assert 1 <= len(top) <= 4 and top[token] == chosen == max(top.values())  # greedy: top-1
        assert sum(math.exp(v) for v in top.values()) <= 1.0 + 1e-5


def test_chat_top_logprobs(client):
    out = client.chat.completions.create(
        messages=[{"role": "user", "content": "hi"}],
        max_tokens=3,
        logprobs=True,
        top_logprobs=4,
        **GREEDY,
    )
    for entry in out.choices[0].logprobs.content:
        values = [t.logprob for t in entry.top_logprobs]
        assert len(values) == 4 and values == sorted(values, reverse=True)
        assert entry.logprob == values[0]


def test_logit_bias_forces_a_token_and_min_tokens_holds_off_the_stop(client):
    out = client.completions.create(
        prompt="Hello", max_tokens=3, logprobs=0, logit_bias={"100": 100}, **GREEDY
    )
    tokens = out.choices[0].logprobs.tokens
    echoed = client.completions.create(prompt=[100], max_tokens=1, echo=True, **GREEDY)
    assert tokens == [tokens[0]] * 3 and echoed.choices[0].text.startswith(tokens[0])
    body = {"stop_token_ids": [100], "min_tokens": 2, "ignore_eos": True}
    out = client.completions.create(
        prompt="Hello", max_tokens=5, logit_bias={"100": 100}, extra_body=body, **GREEDY
    )
    assert out.usage.completion_tokens == 3 and out.choices[0].finish_reason == "stop"


def test_echo_prefixes_the_prompt(client):
    plain = client.completions.create(prompt="Hello there", max_tokens=4, **GREEDY)
    echoed = client.completions.create(prompt="Hello there", max_tokens=4, echo=True, **GREEDY)
    assert echoed.choices[0].text == "Hello there" + plain.choices[0].text


def test_echo_with_logprobs_scores_the_prompt(client):
    """The prompt's tokens come first, the first with a null logprob; each later one carries
    the top-k a generation from the tokens before it reports, in one body and in a stream."""
    ids = [5, 6, 7, 8, 9]
    body = {"prompt": ids, "max_tokens": 2, "logprobs": 2, **GREEDY}
    plain = client.completions.create(**body)
    out = client.completions.create(**body, echo=True)
    lp = out.choices[0].logprobs
    assert len(lp.tokens) == len(ids) + 2 and lp.token_logprobs[0] is None
    assert lp.top_logprobs[0] is None
    assert lp.tokens[len(ids) :] == plain.choices[0].logprobs.tokens
    prefix_len = len(out.choices[0].text) - len(plain.choices[0].text)
    assert lp.text_offset[0] == 0 and lp.text_offset[len(ids)] == prefix_len
    for k in range(1, len(ids)):
        step = client.completions.create(prompt=ids[:k], max_tokens=1, logprobs=2, **GREEDY)
        (expected,) = step.choices[0].logprobs.top_logprobs
        scored = lp.top_logprobs[k]
        assert {t: scored[t] for t in expected} == pytest.approx(expected, abs=1e-4)
        assert scored[lp.tokens[k]] == lp.token_logprobs[k]
    chunks = [c for c in client.completions.create(**body, echo=True, stream=True) if c.choices]
    streamed = [t for c in chunks if c.choices[0].logprobs for t in c.choices[0].logprobs.tokens]
    assert streamed == lp.tokens and chunks[0].choices[0].logprobs.token_logprobs[0] is None


def test_best_of_returns_n_of_more_candidates_and_chat_takes_n(client):
    out = client.completions.create(
        model="builtin",
        prompt="Hello",
        max_tokens=4,
        n=2,
        best_of=4,
        seed=3,
        extra_body={"ignore_eos": True},  # every candidate runs its 4 tokens, whatever it draws
    )
    assert len(out.choices) == 2 and out.usage.completion_tokens == 16
    with pytest.raises(openai.BadRequestError, match="best_of"):
        client.completions.create(model="builtin", prompt="x", max_tokens=2, n=3, best_of=2)
    chat = client.chat.completions.create(
        model="builtin",
        messages=[{"role": "user", "content": "hi"}],
        max_tokens=3,
        n=2,
        extra_body={"ignore_eos": True},
    )
    assert [c.index for c in chat.choices] == [0, 1] and chat.usage.completion_tokens == 6


def test_penalties_change_greedy_output(client):
    base = client.completions.create(prompt="Hello", max_tokens=24, **GREEDY)
    penalized = client.completions.create(
        prompt="Hello",
        max_tokens=24,
        frequency_penalty=2.0,
        presence_penalty=2.0,
        extra_body={"repetition_penalty": 3.0, "ignore_eos": True},
        **GREEDY,
    )
    assert penalized.choices[0].text != base.choices[0].text


SCHEMA = {
    "type": "object",
    "properties": {"name": {"type": "string", "maxLength": 6}, "ok": {"type": "boolean"}},
    "required": ["name", "ok"],
}


def test_response_format_json_schema(client):
    import jsonschema

    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": SCHEMA}}
    for temperature in (0.0, 1.0):
        out = client.chat.completions.create(
            model="builtin",
            messages=[{"role": "user", "content": "a person"}],
            max_tokens=100,
            temperature=temperature,
            seed=4,
            response_format=fmt,
        )
        assert out.choices[0].finish_reason == "stop"
        jsonschema.validate(json.loads(out.choices[0].message.content), SCHEMA)


def test_guided_regex_and_choice(client):
    out = client.completions.create(
        prompt="code:", max_tokens=20, extra_body={"guided_regex": "[A-Z]{2}[0-9]{2}"}, **GREEDY
    )
    assert re.fullmatch("[A-Z]{2}[0-9]{2}", out.choices[0].text)
    out = client.completions.create(
        model="builtin",
        prompt="pick:",
        max_tokens=10,
        stream=True,
        extra_body={"guided_choice": ["left", "right"]},
    )
    assert "".join(c.choices[0].text for c in out if c.choices) in ("left", "right")


def test_bad_or_conflicting_constraints_are_400(client):
    with pytest.raises(openai.BadRequestError, match="cannot compile the json_schema"):
        client.completions.create(
            prompt="x", max_tokens=5, extra_body={"guided_json": {"type": "bogus"}}, **GREEDY
        )
    with pytest.raises(openai.BadRequestError, match="one structured-output constraint"):
        client.completions.create(
            prompt="x",
            max_tokens=5,
            extra_body={"response_format": {"type": "json_object"}, "guided_regex": "a+"},
            **GREEDY,
        )
