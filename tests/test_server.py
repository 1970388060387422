"""The OpenAI-compatible server, driven by the official ``openai`` client against a live
``nanoflow serve builtin`` on a random local port (started once for the module)."""

from __future__ import annotations

import asyncio
import re
import time

import httpx
import openai
import pytest

from nanoflow.cli.main import build_parser
from nanoflow.server.launch import ServerProcess

API_KEY = "test-key"
MAX_MODEL_LEN = 256
TIMEOUT = 60.0


@pytest.fixture(scope="module")
def server():
    with ServerProcess(
        [
            "builtin",
            "--max-model-len",
            str(MAX_MODEL_LEN),
            "--api-key",
            API_KEY,
            "--enable-prefix-caching",
        ]
    ) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(
        base_url=f"{server.url}/v1", api_key=API_KEY, timeout=TIMEOUT, max_retries=0
    )


def http(server, method: str, path: str, key: str | None = API_KEY, **kwargs) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.request(method, f"{server.url}{path}", headers=headers, timeout=TIMEOUT, **kwargs)


def metrics(server) -> dict[str, float]:
    text = http(server, "GET", "/metrics", key=None).text
    values = {}
    for line in text.splitlines():
        match = re.match(r"^(nanoflow_\w+)\{[^}]*\} (\S+)$", line)
        if match:
            values[match[1]] = float(match[2])
    return values


def wait_idle(server, timeout: float = 10.0) -> dict[str, float]:
    """Poll /metrics until nothing runs or waits and every KV block is free."""
    deadline = time.monotonic() + timeout
    while True:
        m = metrics(server)
        idle = m["nanoflow_num_requests_running"] == 0 and m["nanoflow_num_requests_waiting"] == 0
        if idle and m["nanoflow_kv_cache_free_blocks"] == m["nanoflow_kv_cache_total_blocks"]:
            return m
        assert time.monotonic() < deadline, f"engine still busy: {m}"
        time.sleep(0.1)


def test_binds_localhost_by_default(server):
    args = build_parser().parse_args(["serve", "builtin"])
    assert args.host == "127.0.0.1"
    listening = set()
    with open("/proc/net/tcp") as f:
        table = f.read().splitlines()[1:]
    for line in table:
        local, state = line.split()[1], line.split()[3]
        if state == "0A":
            listening.add(local)
    assert f"0100007F:{server.port:04X}" in listening


def test_models(client):
    models = client.models.list().data
    assert [m.id for m in models] == ["builtin"]


def test_completion(client):
    out = client.completions.create(
        model="builtin", prompt="Hello, my name is", max_tokens=5, extra_body={"ignore_eos": True}
    )
    choice = out.choices[0]
    assert choice.finish_reason == "length" and isinstance(choice.text, str)
    assert out.usage.completion_tokens == 5
    assert out.usage.prompt_tokens > 0
    assert out.usage.total_tokens == out.usage.prompt_tokens + 5


def test_usage_reports_prompt_tokens_from_the_prefix_cache(client, server):
    prompt = "the quick brown fox jumps over the lazy dog and runs far away " * 4
    outs = [
        client.completions.create(model="builtin", prompt=prompt, max_tokens=2, temperature=0)
        for _ in range(2)
    ]
    first, second = (o.usage.prompt_tokens_details.cached_tokens for o in outs)
    assert first == 0 and second >= 16 and second % 16 == 0  # whole 16-token blocks
    assert second < outs[1].usage.prompt_tokens
    assert outs[0].choices[0].text == outs[1].choices[0].text
    assert metrics(server)["nanoflow_prefix_cache_hit_tokens"] >= second


def test_completion_stream_usage_and_logprobs(client):
    chunks = list(
        client.completions.create(
            model="builtin",
            prompt=[5, 6, 7, 8],
            max_tokens=7,
            temperature=0.0,
            logprobs=1,
            stream=True,
            stream_options={"include_usage": True},
            extra_body={"ignore_eos": True},
        )
    )
    usage = chunks[-1].usage
    assert usage is not None and chunks[-1].choices == []
    logprobs = [lp for c in chunks[:-1] for lp in c.choices[0].logprobs.token_logprobs]
    assert usage.completion_tokens == len(logprobs) == 7
    assert usage.prompt_tokens == 4
    assert all(lp <= 0.0 for lp in logprobs)
    assert chunks[-2].choices[0].finish_reason == "length"


def test_chat_stream_matches_non_stream(client):
    messages = [{"role": "user", "content": "Hello, how are you?"}]
    full = client.chat.completions.create(
        model="builtin", messages=messages, max_completion_tokens=12, temperature=0.0
    )
    text = full.choices[0].message.content
    assert full.choices[0].message.role == "assistant"
    chunks = list(
        client.chat.completions.create(
            model="builtin",
            messages=messages,
            max_tokens=12,
            temperature=0.0,
            logprobs=True,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == text
    tokens = [t for c in chunks if c.choices for t in c.choices[0].logprobs.content]
    assert chunks[-1].usage.completion_tokens == len(tokens) == full.usage.completion_tokens


def _ascii_stop(text: str) -> str:
    match = re.search(r"[A-Za-z]{2}", text[3:])
    if match is None:
        pytest.skip(f"no ASCII stop candidate in {text!r}")
    return match[0]


@pytest.mark.parametrize("stream", [False, True])
def test_stop_string_trims_text(client, stream):
    kwargs = dict(model="builtin", prompt="The quick brown fox", temperature=0.0)
    kwargs["extra_body"] = {"ignore_eos": True}
    text = client.completions.create(max_tokens=40, **kwargs).choices[0].text
    stop = _ascii_stop(text)
    expected = text[: text.find(stop)]
    if stream:
        chunks = list(client.completions.create(max_tokens=40, stop=[stop], stream=True, **kwargs))
        got = "".join(c.choices[0].text for c in chunks)
        reason = chunks[-1].choices[0].finish_reason
    else:
        choice = client.completions.create(max_tokens=40, stop=stop, **kwargs).choices[0]
        got, reason = choice.text, choice.finish_reason
    assert got == expected
    assert reason == "stop"


def test_n_choices_and_max_tokens(client):
    out = client.completions.create(
        model="builtin",
        prompt="Once upon a time",
        n=3,
        max_tokens=4,
        extra_body={"ignore_eos": True},
    )
    assert sorted(c.index for c in out.choices) == [0, 1, 2]
    assert out.usage.completion_tokens == 12


def test_seed_gives_same_text(client):
    def sample(seed: int) -> str:
        out = client.completions.create(
            model="builtin",
            prompt="Hello",
            max_tokens=16,
            temperature=1.0,
            seed=seed,
            extra_body={"ignore_eos": True},
        )
        return out.choices[0].text

    first = sample(123)
    assert sample(123) == first
    assert sample(124) != first or sample(125) != first


def test_64_concurrent_streams(server):
    async def one(aclient: openai.AsyncOpenAI, i: int) -> tuple[int, int]:
        stream = await aclient.completions.create(
            model="builtin",
            prompt=f"Request number {i}",
            max_tokens=6,
            stream=True,
            stream_options={"include_usage": True},
            extra_body={"ignore_eos": True},
        )
        chunks = [c async for c in stream]
        return len([c for c in chunks if c.choices]), chunks[-1].usage.completion_tokens

    async def main() -> list[tuple[int, int]]:
        aclient = openai.AsyncOpenAI(
            base_url=f"{server.url}/v1", api_key=API_KEY, timeout=TIMEOUT, max_retries=0
        )
        async with aclient:
            return await asyncio.wait_for(
                asyncio.gather(*(one(aclient, i) for i in range(64))), 120
            )

    results = asyncio.run(main())
    assert results == [(6, 6)] * 64
    wait_idle(server)


def test_disconnect_aborts_request(server):
    before = metrics(server)["nanoflow_generation_tokens_total"]
    body = {"prompt": "Hello", "max_tokens": 240, "stream": True, "ignore_eos": True}
    headers = {"Authorization": f"Bearer {API_KEY}"}
    with (
        httpx.Client(timeout=TIMEOUT) as h,
        h.stream("POST", f"{server.url}/v1/completions", json=body, headers=headers) as resp,
    ):
        assert resp.status_code == 200
        lines = resp.iter_lines()
        for _ in range(3):
            next(lines)
        assert metrics(server)["nanoflow_num_requests_running"] == 1
    m = wait_idle(server, timeout=5.0)
    assert m["nanoflow_generation_tokens_total"] - before < 200


BAD_REQUESTS = [
    ("/v1/completions", b'{"model": "builtin", "prompt": ', 400),
    ("/v1/completions", {"prompt": "hi", "max_tokens": "many"}, 400),
    ("/v1/completions", {"prompt": "hi", "max_tokens": -1}, 400),
    ("/v1/completions", {"prompt": "hi", "max_tokens": 10**12}, 400),
    ("/v1/completions", {"prompt": [7] * (MAX_MODEL_LEN + 5), "max_tokens": 1}, 400),
    ("/v1/completions", {"prompt": [100000], "max_tokens": 1}, 400),
    ("/v1/completions", {"prompt": "", "max_tokens": 1}, 400),
    ("/v1/completions", {"prompt": [], "max_tokens": 1}, 400),
    ("/v1/completions", {"prompt": "hi", "temperature": -1}, 400),
    ("/v1/completions", {"prompt": "hi", "stop": [""]}, 400),
    ("/v1/completions", {"prompt": "hi", "n": 0}, 400),
    ("/v1/completions", {"model": "gpt-9", "prompt": "hi"}, 404),
    ("/v1/completions", [1, 2, 3], 400),
    ("/v1/chat/completions", {"messages": []}, 400),
    ("/v1/chat/completions", {"messages": [{"role": "wizard", "content": "x"}]}, 400),
    ("/v1/chat/completions", {"messages": "hello"}, 400),
    ("/v1/nothing", {}, 404),
]


@pytest.mark.parametrize("path, body, status", BAD_REQUESTS)
def test_bad_input_gets_openai_error(server, path, body, status):
    kwargs = {"content": body} if isinstance(body, bytes) else {"json": body}
    resp = http(server, "POST", path, **kwargs)
    assert resp.status_code == status, resp.text
    error = resp.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]


def test_bad_input_through_client(client):
    with pytest.raises(openai.BadRequestError, match="context"):
        client.completions.create(model="builtin", prompt=[3] * 250, max_tokens=10)
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "x"}])


def test_api_key(server):
    body = {"prompt": "hi", "max_tokens": 1}
    assert http(server, "POST", "/v1/completions", key=None, json=body).status_code == 401
    assert http(server, "POST", "/v1/completions", key="wrong", json=body).status_code == 401
    assert http(server, "GET", "/v1/models", key="wrong").status_code == 401
    assert http(server, "POST", "/v1/completions", json=body).status_code == 200
    assert http(server, "GET", "/health", key=None).status_code == 200
