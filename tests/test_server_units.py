"""Pieces of the front end that need no server: tokenizing off the loop, length refusal, the
request guard's helpers, field refusal and the CPU thread rule."""

from __future__ import annotations

import asyncio
import threading

import pytest

from nanoflow.server.engine_process import cpu_threads
from nanoflow.server.errors import APIError
from nanoflow.server.guard import RequestGuard, _undecodable, first_bad_string
from nanoflow.server.protocol import refused_fields
from nanoflow.server.streaming import openai_finish_reason
from nanoflow.server.tokenizing import FrontEndTokenizer


class FakeTokenizer:
    """One token per character (longest vocabulary entry: 4 bytes); records the calling thread."""

    def __init__(self) -> None:
        self.threads: list[threading.Thread] = []

    def get_vocab(self) -> dict[str, int]:
        return {"a": 0, "b": 1, "abcd": 2}

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        self.threads.append(threading.current_thread())
        return [0] * len(text)


def test_encoding_runs_off_the_event_loop_thread():
    fake = FakeTokenizer()
    tokenizer = FrontEndTokenizer(fake)

    async def main() -> list[int]:
        return await tokenizer.encode("abc", max_model_len=100, param="prompt")

    assert asyncio.run(main()) == [0, 0, 0]
    assert fake.threads and fake.threads[0] is not threading.main_thread()
    tokenizer.close()


def test_hopeless_length_is_refused_without_tokenizing():
    fake = FakeTokenizer()
    tokenizer = FrontEndTokenizer(fake)
    assert tokenizer.max_token_bytes == 4
    tokenizer.check_length("x" * 399, max_model_len=100, param="prompt")
    with pytest.raises(APIError, match="at least 100 tokens") as refused:
        asyncio.run(tokenizer.encode("x" * 400, max_model_len=100, param="prompt"))
    assert refused.value.param == "prompt" and not fake.threads
    tokenizer.close()


def test_first_bad_string_names_the_field():
    body = {"messages": [{"role": "user", "content": "ok"}, {"content": "x\udcff"}]}
    assert first_bad_string(body) == "messages.1.content"
    assert first_bad_string({"prompt": ["fine", 3, None]}) is None
    assert _undecodable(b'{"prompt": "fine"}') is None
    error = _undecodable(b'{"a": 1, "prompt": "\xff"}')
    assert error.status == 400 and error.param == "prompt"


def test_only_real_use_of_an_unsupported_field_is_refused():
    assert refused_fields({"tools": [], "tool_choice": "none", "user": "x"}) == []
    assert refused_fields({"tools": [{"type": "function"}], "suffix": "!"}) == ["suffix", "tools"]


def test_finish_reasons_are_openai_values():
    assert [openai_finish_reason(r) for r in ("stop", "length", "abort", None)] == [
        "stop",
        "length",
        "stop",
        "stop",
    ]


def test_cpu_threads_grow_with_the_model_and_stop_at_the_cores():
    assert cpu_threads(5_000_000, cores=16) == 1
    assert cpu_threads(800_000_000, cores=16) == 8
    assert cpu_threads(8_000_000_000, cores=16) == 16


def _call_guard(guard: RequestGuard, path: str, headers: list, body: bytes) -> tuple[int, bytes]:
    sent: list[dict] = []
    chunks = [{"type": "http.request", "body": body, "more_body": False}]

    async def receive() -> dict:
        return chunks.pop(0) if chunks else {"type": "http.disconnect"}

    async def send(message: dict) -> None:
        sent.append(message)

    scope = {"type": "http", "method": "POST", "path": path, "headers": headers}
    asyncio.run(guard(scope, receive, send))
    return sent[0]["status"], sent[1]["body"]


def test_guard_refuses_while_draining_without_a_key_and_over_the_limit():
    async def app(scope, receive, send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": (await receive())["body"]})

    key = [(b"authorization", b"Bearer k")]
    guard = RequestGuard(app, api_key="k", max_request_bytes=10, draining=lambda: False)
    assert _call_guard(guard, "/v1/completions", key, b"{}") == (200, b"{}")
    assert _call_guard(guard, "/v1/completions", [], b"{}")[0] == 401
    assert _call_guard(guard, "/health", [], b"{}")[0] == 200
    assert _call_guard(guard, "/v1/completions", key, b"x" * 11)[0] == 413
    declared = [*key, (b"content-length", b"1000")]
    assert _call_guard(guard, "/v1/completions", declared, b"")[0] == 413
    draining = RequestGuard(app, api_key=None, max_request_bytes=10, draining=lambda: True)
    status, body = _call_guard(draining, "/v1/completions", [], b"{}")
    assert status == 503 and b"shutting down" in body
