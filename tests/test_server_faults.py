"""Failure paths of the server: a request that fails inside the engine, fuzzed input from the
OpenAPI schema, and a dead engine process. Runs its own server (the last test kills its engine)."""

from __future__ import annotations

import os
import signal
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest

from nanoflow.server.launch import ServerProcess

TIMEOUT = 60.0
FAULT_PREFIX = "FAULT!"


@pytest.fixture(scope="module")
def server():
    srv = ServerProcess(["builtin", "--max-model-len", "128"])
    script = Path(__file__).with_name("fault_server.py")
    srv.command = [sys.executable, str(script), FAULT_PREFIX, *srv.command[4:]]
    with srv:
        yield srv


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(
        base_url=f"{server.url}/v1", api_key="unused", timeout=TIMEOUT, max_retries=0
    )


@pytest.mark.parametrize("stream", [False, True])
def test_engine_failure_is_500_for_that_request_only(client, stream):
    def normal() -> int:
        chunks = client.completions.create(
            model="builtin",
            prompt="A normal request",
            max_tokens=30,
            stream=True,
            stream_options={"include_usage": True},
            extra_body={"ignore_eos": True},
        )
        return list(chunks)[-1].usage.completion_tokens

    with ThreadPoolExecutor(1) as pool:
        good = pool.submit(normal)
        time.sleep(0.2)
        with pytest.raises(openai.InternalServerError, match="injected fault"):
            client.completions.create(
                model="builtin", prompt=f"{FAULT_PREFIX} then text", max_tokens=5, stream=stream
            )
        assert good.result(timeout=TIMEOUT) == 30


def _capped(body: object) -> object:
    """Keep fuzzed generations short: the schema allows long ones, CPU time does not."""
    if isinstance(body, dict):
        for key in ("max_tokens", "max_completion_tokens", "n", "best_of"):
            if isinstance(body.get(key), int) and not isinstance(body[key], bool):
                body[key] = min(body[key], 4)
        if "messages" in body and "max_tokens" not in body:
            body.setdefault("max_completion_tokens", 4)
    return body


def test_fuzzed_requests_get_no_5xx_and_answers_that_match_the_schema(server):
    """Every answer conforms to the OpenAPI schema (status, content type, body) and invalid data
    is refused. Schema-valid requests may still be refused for the model's limits (vocabulary,
    context), which the schema cannot state, so acceptance of valid data is not checked."""
    import schemathesis
    from hypothesis import HealthCheck, given, settings
    from hypothesis.errors import Unsatisfiable
    from schemathesis.checks import positive_data_acceptance

    schema = schemathesis.openapi.from_url(f"{server.url}/openapi.json", wait_for_schema=30)
    modes = (schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE)
    failures = []
    for result in schema.get_all_operations():
        operation = result.ok()
        for mode in modes:

            @settings(
                max_examples=30,
                derandomize=True,  # the same examples on every run: CI stays reproducible
                deadline=None,
                database=None,
                suppress_health_check=list(HealthCheck),
            )
            @given(case=operation.as_strategy(generation_mode=mode))
            def check(case) -> None:
                case.body = _capped(case.body)
                response = case.call(base_url=server.url, timeout=TIMEOUT)
                try:
                    case.validate_response(response, excluded_checks=[positive_data_acceptance])
                except Exception as exc:  # schemathesis' FailureGroup: every check that failed
                    failures.append((case.method, case.path, case.body, str(exc)[-600:]))

            try:
                check()
            except Unsatisfiable:  # nothing to make invalid (an operation without inputs)
                assert mode is schemathesis.GenerationMode.NEGATIVE
    assert not failures, failures[:5]


def test_model_without_tokenizer_takes_token_ids(tmp_path):
    """Dummy-weight registry models have no tokenizer: token ids in, token ids (no text) out."""
    with ServerProcess(["builtin", "--tokenizer", str(tmp_path), "--max-model-len", "64"]) as srv:
        client = openai.OpenAI(
            base_url=f"{srv.url}/v1", api_key="unused", timeout=TIMEOUT, max_retries=0
        )
        out = client.completions.create(
            model="builtin",
            prompt=[5, 6, 7],
            max_tokens=3,
            logprobs=1,
            extra_body={"ignore_eos": True},
        )
        assert out.choices[0].text == "" and out.usage.completion_tokens == 3
        assert out.choices[0].logprobs.tokens[0].startswith("token_id:")
        with pytest.raises(openai.BadRequestError, match="no tokenizer"):
            client.completions.create(model="builtin", prompt="text", max_tokens=3)
        with pytest.raises(openai.BadRequestError, match="no tokenizer"):
            client.chat.completions.create(
                model="builtin", messages=[{"role": "user", "content": "x"}], max_tokens=3
            )


def test_dead_engine_fails_requests_then_the_server_exits_nonzero(server):
    """Without --engine-restarts a dead engine ends the server with status 1, so a supervisor
    notices; until it is gone, requests get 503."""
    (pid,) = server.engine_pids()
    os.kill(pid, signal.SIGKILL)
    try:
        resp = httpx.post(
            f"{server.url}/v1/completions", json={"prompt": "hi", "max_tokens": 2}, timeout=TIMEOUT
        )
        assert resp.status_code == 503 and resp.json()["error"]["type"] == "service_unavailable"
    except httpx.TransportError:
        pass  # already gone
    assert server.process.wait(30) == 1
    assert "will not be restarted; exiting" in server.log()
