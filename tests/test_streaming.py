"""server/streaming.py: incremental detokenizing, holding back what may become a stop string, and
the finish reasons a stream reports."""

from __future__ import annotations

from nanoflow.engine.engine_core import RequestOutput
from nanoflow.server.streaming import (
    ChoiceState,
    IncrementalDecoder,
    held_back,
    openai_finish_reason,
)


def byte_decode(ids: list[int]) -> str:
    """A byte-level toy vocabulary: token i is byte i; broken UTF-8 decodes to U+FFFD, as a
    tokenizer's byte-level decoding does."""
    return bytes(ids).decode("utf-8", errors="replace")


def output(ids: list[int], finished: bool = False, reason: str | None = None, stop=None):
    return RequestOutput("r", ids, [-0.5] * len(ids), 3, len(ids), finished, reason, stop)


def test_incremental_text_waits_for_whole_characters() -> None:
    decoder = IncrementalDecoder(byte_decode)
    euro = list("€".encode())  # three bytes
    decoder.add([ord("a")])
    assert decoder.text == "a"
    decoder.add(euro[:2])  # half a character: nothing new yet
    assert decoder.text == "a"
    decoder.add(euro[2:] + [ord("b")])
    assert decoder.text == "a€b"
    assert decoder.final_text(None) == "a€b"
    assert decoder.final_text(2) == "a€"


def test_without_a_tokenizer_only_ids_are_kept() -> None:
    decoder = IncrementalDecoder(None)
    decoder.add([5, 6])
    assert decoder.token_ids == [5, 6] and decoder.text == "" and decoder.final_text(None) == ""


def test_held_back_is_the_longest_tail_that_starts_a_stop() -> None:
    assert held_back("hello wor", ["world"]) == 3
    assert held_back("hello", ["lo!", "o!!"]) == 2
    assert held_back("hello", ["xyz"]) == 0
    assert held_back("xa", ["ab"]) == 1
    assert held_back("ab", ["ab"]) == 0  # a whole stop string is the engine's to trim


def test_a_stream_never_shows_text_the_stop_trims() -> None:
    state = ChoiceState(byte_decode, stops=["END"])
    emitted = [state.update(output([ord(c)])).text for c in "okE"]
    assert "".join(emitted) == "ok"  # "E" may start "END": held back
    final = state.update(output([ord("N"), ord("D")], True, "stop", stop=2))
    assert final.text == "" and state.emitted == "ok" and state.finish_reason == "stop"
    assert state.logprobs == [-0.5] * 5 and state.token_ids == list(b"okEND")
    assert len(state.inter_token_seconds) == 3 and state.mean_logprob == -0.5


def test_held_text_comes_out_when_it_turns_out_not_to_be_a_stop() -> None:
    state = ChoiceState(byte_decode, stops=["END"])
    assert state.update(output([ord("E")])).text == ""
    delta = state.update(output([ord("x")], True, "length"))
    assert delta.text == "Ex" and delta.text_offset == 0 and delta.finish_reason == "length"


def test_engine_ends_outside_openais_values_read_as_stop() -> None:
    assert openai_finish_reason("length") == "length"
    assert openai_finish_reason("stop") == "stop"
    for other in ("abort", "error", None):
        assert openai_finish_reason(other) == "stop"
