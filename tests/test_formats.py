"""server/formats.py: the OpenAI response shapes of /v1/completions and /v1/chat/completions,
their streamed chunks, logprobs objects and usage."""

from __future__ import annotations

import json

from nanoflow.engine.engine_core import RequestOutput
from nanoflow.server.formats import ChatFormat, CompletionFormat, usage
from nanoflow.server.streaming import ChoiceState, Delta

VOCAB = {1: "He", 2: "llo", 3: " there", 7: "!"}


def token_text(token_id: int) -> str:
    return VOCAB[token_id]


def state_with(ids: list[int], logprobs: list[float], top, prompt_logprobs=None) -> ChoiceState:
    state = ChoiceState(lambda t: "".join(VOCAB[i] for i in t), stops=[])
    out = RequestOutput("r", ids, logprobs, 2, len(ids), True, "length", new_top_logprobs=top)
    out.prompt_logprobs = prompt_logprobs
    state.update(out)
    return state


def test_usage_counts_and_cached_tokens() -> None:
    assert usage(5, 3, 2) == {
        "prompt_tokens": 5,
        "completion_tokens": 3,
        "total_tokens": 8,
        "prompt_tokens_details": {"cached_tokens": 2},
    }


def test_completion_response_with_legacy_logprobs() -> None:
    fmt = CompletionFormat("m", token_text, logprobs=True, prefixes=["Say: "])
    state = state_with([1, 2], [-0.1, -0.2], [[(1, -0.1), (7, -3.0)], [(2, -0.2), (3, -1.5)]])
    body = fmt.response([state], usage(2, 2))
    assert body["object"] == "text_completion" and body["id"].startswith("cmpl-")
    (choice,) = body["choices"]
    assert choice["text"] == "Say: Hello" and choice["finish_reason"] == "length"
    lp = choice["logprobs"]
    assert lp["tokens"] == ["He", "llo"] and lp["token_logprobs"] == [-0.1, -0.2]
    assert lp["text_offset"] == [5, 7]  # characters into the returned text, echo included
    assert lp["top_logprobs"] == [{"He": -0.1, "!": -3.0}, {"llo": -0.2, " there": -1.5}]
    assert body["usage"]["total_tokens"] == 4


def test_echo_with_logprobs_lists_the_prompt_tokens_first() -> None:
    """As OpenAI's: the first prompt token has a null logprob and no alternatives; offsets run
    through the echoed prompt into the generated text."""
    scores = [None, (-0.5, [(7, -0.3), (2, -0.5)]), (-2.0, [(7, -0.1)])]
    fmt = CompletionFormat("m", token_text, logprobs=True, prefixes=["Hello there"])
    fmt.prompt_ids = [[1, 2, 3]]
    state = state_with([7], [-0.1], [[(7, -0.1)]], scores)
    (choice,) = fmt.response([state], usage(3, 1))["choices"]
    assert choice["text"] == "Hello there!"
    lp = choice["logprobs"]
    assert lp["tokens"] == ["He", "llo", " there", "!"]
    assert lp["token_logprobs"] == [None, -0.5, -2.0, -0.1]
    assert lp["top_logprobs"] == [None, {"!": -0.3, "llo": -0.5}, {"!": -0.1, " there": -2.0},
                                  {"!": -0.1}]  # fmt: skip
    assert lp["text_offset"] == [0, 2, 5, 11]
    first = fmt.chunk(0, Delta("!", [7], [-0.1], 0, None, [[(7, -0.1)]], scores), first=True)
    assert first["choices"][0]["logprobs"] == lp
    later = fmt.chunk(0, Delta("!", [7], [-0.1], 1, None, [[(7, -0.1)]]), first=False)
    assert later["choices"][0]["logprobs"]["tokens"] == ["!"]
    assert later["choices"][0]["logprobs"]["text_offset"] == [12]


def test_completion_chunks_echo_only_first_and_carry_no_logprobs_unless_asked() -> None:
    fmt = CompletionFormat("m", token_text, logprobs=False, prefixes=["P "])
    first = fmt.chunk(0, Delta("He", [1], [-0.1], 0), first=True)
    later = fmt.chunk(0, Delta("llo", [2], [-0.2], 2, "stop"), first=False)
    assert first["choices"][0]["text"] == "P He" and later["choices"][0]["text"] == "llo"
    assert first["choices"][0]["logprobs"] is None
    assert later["choices"][0]["finish_reason"] == "stop" and first["id"] == later["id"]
    assert fmt.usage_chunk(usage(1, 2))["choices"] == []


def test_chat_response_and_chunks() -> None:
    fmt = ChatFormat("m", token_text, logprobs=True)
    state = state_with([1, 7], [-0.1, -0.4], [[(1, -0.1)], [(7, -0.4), (2, -2.0)]])
    body = fmt.response([state], usage(2, 2))
    assert body["object"] == "chat.completion" and body["id"].startswith("chatcmpl-")
    (choice,) = body["choices"]
    assert choice["message"] == {"role": "assistant", "content": "He!"}
    content = choice["logprobs"]["content"]
    assert [c["token"] for c in content] == ["He", "!"]
    assert content[1]["bytes"] == list(b"!")
    assert [t["token"] for t in content[1]["top_logprobs"]] == ["!", "llo"]
    first = fmt.chunk(0, Delta("He", [1], [-0.1], 0), first=True)
    assert first["object"] == "chat.completion.chunk"
    assert first["choices"][0]["delta"] == {"content": "He", "role": "assistant"}
    later = fmt.chunk(0, Delta("!", [7], [-0.4], 2, "stop"), first=False)
    assert later["choices"][0]["delta"] == {"content": "!"}


def test_ruled_out_tokens_have_a_finite_logprob() -> None:
    """JSON has no -inf: a token the sampler ruled out (top-p, a grammar) reads as -9999."""
    for fmt in (CompletionFormat("m", token_text, True), ChatFormat("m", token_text, True)):
        state = state_with([1], [float("-inf")], [[(1, float("-inf")), (7, float("nan"))]])
        text = json.dumps(fmt.response([state], usage(1, 1)), allow_nan=False)
        assert "-9999.0" in text
