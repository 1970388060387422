"""``nanoflow bench serve --goodput``: the rate of requests that met every latency SLO."""

from __future__ import annotations

import json

import pytest

from nanoflow.cli.bench_serve import RequestResult, _summarize, parse_goodput
from nanoflow.cli.main import main
from nanoflow.errors import ConfigError
from nanoflow.server.launch import ServerProcess


def test_goodput_counts_requests_meeting_every_slo():
    results = [
        RequestResult(ok=True, output_tokens=11, ttft=0.1, latency=0.6),  # tpot 50 ms: good
        RequestResult(ok=True, output_tokens=11, ttft=0.4, latency=0.9),  # ttft too slow
        RequestResult(ok=True, output_tokens=11, ttft=0.1, latency=1.1),  # tpot 100 ms
        RequestResult(ok=False, error="HTTP 503"),
    ]
    summary = _summarize(results, 2.0, goodput=parse_goodput(["ttft:200", "tpot:60"]))
    assert summary["request_goodput"] == 0.5 and summary["goodput_fraction"] == 0.25
    assert summary["goodput_slos_ms"] == {"ttft": 200.0, "tpot": 60.0}
    assert "request_goodput" not in _summarize(results, 2.0)


@pytest.mark.parametrize("bad", ["ttft", "ttft:-1", "latency:5", "tpot:fast"])
def test_bad_goodput_is_a_config_error(bad):
    with pytest.raises(ConfigError, match="--goodput takes METRIC:MS"):
        parse_goodput([bad])


def test_bench_serve_reports_goodput_in_its_json(tmp_path, capsys):
    out = tmp_path / "bench.json"
    with ServerProcess(["builtin", "--max-model-len", "128"]) as server:
        args = ["bench", "serve", "--base-url", server.url, "--workload", "16/4"]
        args += ["--num-prompts", "4", "--output-json", str(out)]
        assert main([*args, "--goodput", "ttft:60000", "tpot:60000"]) == 0
    result = json.loads(out.read_text())["result"]
    assert result["goodput_fraction"] == 1.0 and result["request_goodput"] > 0
    assert "Request goodput (req/s)" in capsys.readouterr().out
