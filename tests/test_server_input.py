"""The server under hostile input: every bad request gets a 4xx that names the field and the
rule, large bodies are refused before they are read, and neither stalls running streams."""

from __future__ import annotations

import json
import re
import threading
import time

import httpx
import pytest
from conftest import SERVER_API_KEY, SERVER_MAX_MODEL_LEN, SERVER_REQUEST_LIMIT

API_KEY = SERVER_API_KEY
MAX_MODEL_LEN = SERVER_MAX_MODEL_LEN
LIMIT = SERVER_REQUEST_LIMIT
TIMEOUT = 60.0
AUTH = {"Authorization": f"Bearer {API_KEY}"}


@pytest.fixture(scope="module")
def server(request_server):
    """The session's request server (conftest), shared with the request-field tests."""
    return request_server


def post(server, path: str, body: object, headers: dict | None = None) -> httpx.Response:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    headers = {**AUTH, "content-type": "application/json", **(headers or {})}
    return httpx.post(f"{server.url}{path}", content=content, headers=headers, timeout=TIMEOUT)


def _chat(content: object) -> dict:
    return {"messages": [{"role": "user", "content": content}], "max_tokens": 2}


C, CHAT = "/v1/completions", "/v1/chat/completions"
HOSTILE = [
    (C, {"prompt": "abc \ud800 def"}, "prompt", "lone surrogate"),
    (C, {"prompt": ["ok", "\udfff"]}, "prompt", r"prompt\[1\] holds a lone surrogate"),
    (CHAT, _chat("x \ud800"), "messages.0.content", "lone surrogate"),
    (C, b'{"prompt": "ab\xff\xfe", "max_tokens": 2}', "prompt", "not valid UTF-8"),
    (CHAT, b'{"messages": [{"role": "user", "content": "\xc3("}]}', "messages.0.content", "UTF-8"),
    (C, {"prompt": [-1, 5]}, "prompt", r"non-negative integers; prompt\[0\] is -1"),
    (C, {"prompt": []}, "prompt", "empty list"),
    (C, {"prompt": [[1, 2], []]}, "prompt", r"prompt\[1\] is an empty token list"),
    (C, {"prompt": ""}, "prompt", "empty string"),
    (CHAT, _chat([{"type": "image_url", "image_url": {"url": "x"}}]), "messages.0.content", "text"),
    (C, {"prompt": "hi", "stop": ["s"] * 10_000}, "stop", "at most 16 stop strings"),
    (C, b'{"prompt": "hi", "temperature": NaN}', "temperature", "finite number"),
    (C, {"prompt": "hi", "max_tokens": True}, "max_tokens", "valid integer"),
    (C, {"prompt": "hi", "n": 2.5}, "n", "valid integer"),
    (C, {"prompt": "hi", "stream": 1}, "stream", "valid boolean"),
    (C, {"prompt": "hi", "tools": [{"type": "function"}]}, "tools", "not supported"),
    (CHAT, _chat("x") | {"tool_choice": "auto"}, "tool_choice", "not supported"),
    (CHAT, _chat("x") | {"top_logprobs": 2}, "top_logprobs", "needs logprobs"),
    (C, {"prompt": "hi", "best_of": 1, "n": 2}, "best_of", "at least n"),
    (C, {"prompt": "hi", "best_of": 3, "stream": True}, "best_of", "cannot be streamed"),
    (C, {"prompt": "hi", "functions": [{"name": "f"}]}, "functions", "not supported"),
    (CHAT, _chat("x") | {"function_call": "auto"}, "function_call", "not supported"),
    (CHAT, _chat("x") | {"parallel_tool_calls": True}, "parallel_tool_calls", "not supported"),
    (C, {"prompt": "hi", "logit_bias": {"999999": 1}}, "logit_bias", "token ids below"),
    (
        C,
        {"prompt": "hi", "response_format": {"type": "json_schema"}},
        "response_format.json_schema",
        "Field required",
    ),
]


@pytest.mark.parametrize("path, body, param, message", HOSTILE)
def test_hostile_input_is_400_naming_the_field(server, path, body, param, message):
    resp = post(server, path, body)
    assert resp.status_code == 400, resp.text
    error = resp.json()["error"]
    assert error["param"] == param
    assert re.search(message, error["message"]), error["message"]


def test_malformed_json_names_its_position_not_a_param(server):
    error = post(server, "/v1/completions", b'{"prompt": ').json()["error"]
    assert error["param"] is None and "not valid JSON" in error["message"]
    assert "character 11" in error["message"]


def test_unknown_fields_are_ignored_and_neutral_values_accepted(server):
    body = {"prompt": "hi", "max_tokens": 2, "max_tokns": 3, "tools": [], "user": "u"}
    assert post(server, "/v1/completions", body).status_code == 200
    assert "ignoring the unknown request field 'max_tokns'" in server.log()


def test_auth_comes_before_body_validation(server):
    resp = httpx.post(f"{server.url}/v1/completions", content=b"{not json", timeout=TIMEOUT)
    assert resp.status_code == 401


def test_405_names_the_allowed_methods(server):
    resp = httpx.request("TRACE", f"{server.url}/health", timeout=TIMEOUT)
    assert resp.status_code == 405 and resp.headers["allow"] == "GET"
    resp = httpx.get(f"{server.url}/v1/completions", headers=AUTH, timeout=TIMEOUT)
    assert resp.status_code == 405 and resp.headers["allow"] == "POST"


def test_prompt_longer_than_the_context_is_refused_by_its_length(server):
    resp = post(server, "/v1/completions", {"prompt": "word " * 200_000, "max_tokens": 1})
    assert resp.status_code == 400
    assert resp.json()["error"]["code"] == "context_length_exceeded"


def _rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        line = next(line for line in f if line.startswith("VmRSS:"))
    return int(line.split()[1]) / 1024


def test_oversized_bodies_get_413_and_their_memory_back(server):
    big = b'{"prompt": "' + b"a" * (LIMIT + 10) + b'"}'
    before = _rss_mib(server.process.pid)
    for _ in range(5):
        assert post(server, "/v1/completions", big).status_code == 413

    def chunks():  # no Content-Length: the limit is found by counting
        for _ in range(LIMIT // (1 << 20) + 2):
            yield b"a" * (1 << 20)

    resp = httpx.post(
        f"{server.url}/v1/completions", content=chunks(), headers=AUTH, timeout=TIMEOUT
    )
    assert resp.status_code == 413 and "--max-request-bytes" in resp.json()["error"]["message"]
    assert _rss_mib(server.process.pid) - before < 100
    assert httpx.get(f"{server.url}/health", timeout=TIMEOUT).status_code == 200


def test_a_10mb_prompt_does_not_stall_a_running_stream(server):
    """The property, not a speed: while a 10 MB prompt is received, checked and refused, the
    stream's tokens keep arriving (no gap of a second)."""
    gaps: list[float] = []
    body = {"prompt": "Hello", "max_tokens": 200, "stream": True, "ignore_eos": True}
    started = threading.Event()

    def stream() -> None:
        with httpx.stream(
            "POST", f"{server.url}/v1/completions", json=body, headers=AUTH, timeout=TIMEOUT
        ) as resp:
            last = None
            for line in resp.iter_lines():
                if not line.startswith("data: {"):
                    continue
                now = time.perf_counter()
                if last is not None:
                    gaps.append(now - last)
                last = now
                started.set()

    reader = threading.Thread(target=stream)
    reader.start()
    assert started.wait(TIMEOUT)
    prompt = {"prompt": "z" * (10 * 1024 * 1024), "max_tokens": 1}
    for _ in range(3):
        assert post(server, "/v1/completions", prompt).status_code == 400
    reader.join(TIMEOUT)
    assert len(gaps) >= 100 and max(gaps) < 1.0, max(gaps)
