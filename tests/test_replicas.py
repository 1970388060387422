"""Data-parallel replicas: one front end spreads concurrent requests over two engine processes."""

from __future__ import annotations

import asyncio
import re

import httpx
import openai
import pytest

from nanoflow.server.launch import ServerProcess

TIMEOUT = 60.0


def _replica_metrics(url: str) -> dict[str, dict[str, float]]:
    text = httpx.get(f"{url}/metrics", timeout=TIMEOUT).text
    out: dict[str, dict[str, float]] = {}
    for name, replica, value in re.findall(
        r'^(nanoflow_replica_\w+)\{[^}]*replica="(\d+)"\} (\S+)$', text, re.M
    ):
        out.setdefault(replica, {})[name] = float(value)
    return out


@pytest.mark.timeout(300)
def test_two_replicas_share_the_load():
    with ServerProcess(["builtin", "--max-model-len", "256", "--data-parallel-size", "2"]) as srv:
        client = openai.AsyncOpenAI(
            base_url=f"{srv.url}/v1", api_key="x", timeout=TIMEOUT, max_retries=0
        )

        async def one(i: int) -> int:
            out = await client.completions.create(
                model="builtin",
                prompt=f"Request number {i}:",
                max_tokens=12,
                temperature=0.0,
                extra_body={"ignore_eos": True},
            )
            return out.usage.completion_tokens

        async def all_of_them() -> list[int]:
            return await asyncio.gather(*(one(i) for i in range(16)))

        assert asyncio.run(all_of_them()) == [12] * 16
        replicas = _replica_metrics(srv.url)
        assert set(replicas) == {"0", "1"}
        served = [r["nanoflow_replica_requests"] for r in replicas.values()]
        assert sum(served) == 16 and min(served) >= 4, served
        assert all(r["nanoflow_replica_outstanding_tokens"] == 0 for r in replicas.values())
        health = httpx.get(f"{srv.url}/health", timeout=TIMEOUT)
        assert health.status_code == 200
