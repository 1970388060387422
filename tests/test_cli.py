"""The command line: every flag comes with help and shows its default, options come from the
config dataclasses, and a bad value is one line on stderr with status 2."""

from __future__ import annotations

import argparse
import subprocess
import sys

import pytest

from nanoflow.autotune.options import TuneOptions
from nanoflow.cli.main import _all_parsers, build_parser, engine_kwargs
from nanoflow.config import EngineConfig
from nanoflow.server.config import ServerConfig


def _flags(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    return [a for a in parser._actions if a.option_strings and a.dest != "help"]


def test_every_flag_has_a_help_sentence():
    missing = [
        f"{p.prog} {a.option_strings[0]}"
        for p in _all_parsers(build_parser())
        for a in _flags(p)
        if not a.help
    ]
    assert missing == []


def test_help_shows_the_defaults():
    serve = next(p for p in _all_parsers(build_parser()) if p.prog == "nanoflow serve")
    text = serve.format_help()
    assert "(default: 512)" in text and "(default: 127.0.0.1)" in text


def test_engine_flags_are_engine_config_fields():
    args = build_parser().parse_args(["generate", "--num-kv-blocks", "7", "--no-cuda-graphs"])
    kwargs = engine_kwargs(args)
    assert kwargs["num_kv_blocks"] == 7 and kwargs["cuda_graphs"] is False
    assert EngineConfig(**kwargs) == EngineConfig(num_kv_blocks=7, cuda_graphs=False)


def test_tune_reuses_the_engine_options():
    engine = {f.name: f for f in EngineConfig.__dataclass_fields__.values()}
    for name in ("load_format", "device", "max_num_seqs", "num_kv_blocks", "kv_cache_dtype"):
        tune = TuneOptions.__dataclass_fields__[name]
        assert tune.metadata == engine[name].metadata and tune.default == engine[name].default


def test_server_flags_reach_server_config():
    args = build_parser().parse_args(["serve", "--port", "9001", "--engine-restarts", "2"])
    assert (args.port, args.engine_restarts) == (9001, 2)
    assert ServerConfig(port=9001, engine_restarts=2).max_request_bytes > 0


BAD_FLAGS = [
    ["generate", "--num-kv-blocks", "0", "--prompt", "x"],
    ["generate", "--max-model-len", "0", "--prompt", "x"],
    ["generate", "--device", "cuda", "--prompt", "x"],
    ["generate", "--device", "tpu", "--prompt", "x"],
    ["generate", "--block-size", "12"],
    ["serve", "--port", "70000"],
    ["serve", "--max-request-bytes", "0"],
    ["generate", "--max-num-seqs", "many"],
]


@pytest.fixture(scope="module")
def bad_flag_runs() -> dict[int, subprocess.Popen]:
    """Every bad command line, each in its own ``nanoflow`` process, all started at once (the
    processes spend their time importing, so they overlap instead of queueing)."""
    procs = {
        i: subprocess.Popen(
            [sys.executable, "-m", "nanoflow.cli.main", *argv],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i, argv in enumerate(BAD_FLAGS)
    }
    yield procs
    for proc in procs.values():
        if proc.poll() is None:
            proc.kill()
        proc.communicate()


@pytest.mark.parametrize(
    "index", range(len(BAD_FLAGS)), ids=[f"argv{i}" for i in range(len(BAD_FLAGS))]
)
def test_a_bad_flag_value_is_one_line_and_status_2(bad_flag_runs, index):
    if "cuda" in BAD_FLAGS[index]:
        pytest.importorskip("torch")
        import torch

        if torch.cuda.is_available():
            pytest.skip("this machine has a GPU")
    proc = bad_flag_runs[index]
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 2, stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and "error" in lines[0], stderr
