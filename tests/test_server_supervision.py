"""Failure a supervisor can act on: a dead engine is restarted (bounded), SIGTERM drains, and a
busy port is reported at once. Runs its own server; the last test stops it."""

from __future__ import annotations

import json
import os
import signal
import socket
import threading
import time

import httpx
import pytest

from nanoflow.server.launch import ServerProcess, free_port

TIMEOUT = 60.0
GRACE_S = 1.0
LONG = 2000  # tokens: more than a CPU generates in the grace period


@pytest.fixture(scope="module")
def server():
    args = ["builtin", "--max-model-len", str(LONG + 48), "--engine-restarts", "1"]
    with ServerProcess([*args, "--shutdown-timeout", str(GRACE_S)]) as srv:
        yield srv


def stream_events(server, max_tokens: int, out: list[dict], started: threading.Event) -> None:
    """Every SSE data object of one streamed completion, into ``out``."""
    body = {"prompt": "Hello", "max_tokens": max_tokens, "stream": True, "ignore_eos": True}
    with httpx.stream("POST", f"{server.url}/v1/completions", json=body, timeout=TIMEOUT) as resp:
        for line in resp.iter_lines():
            if line.startswith("data: {"):
                out.append(json.loads(line[len("data: ") :]))
                started.set()


def start_stream(server, max_tokens: int) -> tuple[threading.Thread, list[dict]]:
    events: list[dict] = []
    started = threading.Event()
    thread = threading.Thread(target=stream_events, args=(server, max_tokens, events, started))
    thread.start()
    assert started.wait(TIMEOUT)
    return thread, events


def test_ready_line_names_address_model_executor_and_blocks(server):
    line = next(line for line in server.log().splitlines() if "ready:" in line)
    assert f"serving 'builtin' on {server.url}" in line
    assert "executor sequential" in line and "KV blocks" in line


def test_dead_engine_fails_in_flight_requests_and_is_restarted(server):
    thread, events = start_stream(server, LONG)
    (pid,) = server.engine_pids()
    os.kill(pid, signal.SIGKILL)
    thread.join(TIMEOUT)
    assert "engine is not running" in events[-1]["error"]["message"]
    health = httpx.get(f"{server.url}/health", timeout=TIMEOUT)
    assert health.status_code == 503 and "restarting" in health.json()["error"]["message"]
    deadline = time.monotonic() + TIMEOUT
    while httpx.get(f"{server.url}/health", timeout=TIMEOUT).status_code != 200:
        assert time.monotonic() < deadline, "the engine was not restarted"
        time.sleep(0.2)
    body = {"prompt": "again", "max_tokens": 3, "ignore_eos": True}
    resp = httpx.post(f"{server.url}/v1/completions", json=body, timeout=TIMEOUT)
    assert resp.status_code == 200 and resp.json()["usage"]["completion_tokens"] == 3


def test_sigterm_lets_short_requests_finish_and_cuts_long_streams(server):
    long_thread, long_events = start_stream(server, LONG)
    short_thread, short_events = start_stream(server, 8)
    server.process.send_signal(signal.SIGTERM)
    short_thread.join(TIMEOUT)
    long_thread.join(TIMEOUT)
    assert not any("error" in e for e in short_events)
    assert short_events[-1]["choices"][0]["finish_reason"] == "length"
    finish = [e["choices"][0]["finish_reason"] for e in long_events if e.get("choices")]
    assert finish[-1] == "length" and len(finish) < LONG
    assert "shutting down" in long_events[-1]["error"]["message"]
    # uvicorn re-raises the signal it caught once it has shut down cleanly
    assert server.process.wait(TIMEOUT) in (0, -signal.SIGTERM)
    assert "Traceback" not in server.log()


def test_busy_port_is_reported_before_the_model_loads():
    port = free_port()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", port))
        taken.listen()
        server = ServerProcess(["builtin"], port=port)
        with pytest.raises(RuntimeError, match="server exited early"):
            server.start(timeout=TIMEOUT)
        assert f"cannot listen on 127.0.0.1:{port}" in server.log()
        assert "Traceback" not in server.log()
