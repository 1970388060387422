"""Tensor parallelism over gloo on CPU: TP=2 gives TP=1's greedy tokens."""

from __future__ import annotations

import pytest

from nanoflow import LLM, SamplingParams
from nanoflow.distributed.parallel import ParallelGroup
from nanoflow.errors import ConfigError
from nanoflow.models.registry import get_known_model
from nanoflow.models.sharding import check_divisible

PROMPTS = [[5, 17, 99, 3, 42, 8, 64, 12, 7], [11, 23, 5], [3, 9, 27, 81, 14] * 4]


def _tokens(folder, **kwargs) -> list[list[int]]:
    llm = LLM(str(folder), dtype="float32", device="cpu", **kwargs)
    assert llm.engine.runner.group.size == kwargs.get("tensor_parallel_size", 1)
    assert llm.engine.runner.model.layers[0].num_kv_heads == 2 // llm.engine.runner.group.size
    try:
        params = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)
        return [o.outputs[0].token_ids for o in llm.generate(PROMPTS, params, use_tqdm=False)]
    finally:
        llm.engine.shutdown()


@pytest.mark.timeout(300)
@pytest.mark.parametrize("executor", ["sequential", "overlapped"])
def test_tp2_matches_tp1(llama_checkpoint, executor):
    """Also with the hand-written pipeline: two nano-batches alternating, collectives on a
    network unit, launched in the same order on every rank."""
    folder, _ = llama_checkpoint
    single = _tokens(folder)
    tp2 = _tokens(folder, tensor_parallel_size=2, max_num_batched_tokens=16, executor=executor)
    assert tp2 == single


def test_tp_size_must_divide_heads():
    with pytest.raises(ConfigError, match="num_key_value_heads"):
        check_divisible(ParallelGroup(0, 3), get_known_model("llama-3-8b"))


@pytest.mark.timeout(300)
def test_tp2_switches_schedule_on_every_rank(llama_checkpoint):
    from nanoflow.runtime.schedule import nano_batch_schedule

    folder, _ = llama_checkpoint
    single = _tokens(folder)
    llm = LLM(str(folder), dtype="float32", device="cpu", tensor_parallel_size=2)
    try:
        llm.engine.runner.set_schedule(nano_batch_schedule(2))
        params = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)
        got = [o.outputs[0].token_ids for o in llm.generate(PROMPTS, params, use_tqdm=False)]
    finally:
        llm.engine.shutdown()
    assert got == single


@pytest.mark.timeout(300)
def test_torchrun_style_launch_matches_single_process(llama_checkpoint, tmp_path):
    """Every rank runs the same CLI command with RANK/WORLD_SIZE set, as torchrun does."""
    import json
    import subprocess
    import sys

    folder, _ = llama_checkpoint
    prompt = " ".join(str(t) for t in PROMPTS[0])

    def start(extra: list[str], launcher: list[str]) -> subprocess.Popen:
        cmd = [
            *launcher,
            "-m",
            "nanoflow.cli.main",
            "generate",
            str(folder),
            "--device",
            "cpu",
            "--dtype",
            "float32",
            "--max-tokens",
            "8",
            "--json",
            "--prompt-ids",
            prompt,
            *extra,
        ]
        out = subprocess.PIPE
        return subprocess.Popen(cmd, stdout=out, stderr=out, text=True, cwd=tmp_path)

    def tokens(proc: subprocess.Popen) -> list[int]:
        stdout, stderr = proc.communicate(timeout=240)
        assert proc.returncode == 0, stderr[-2000:]
        lines = [line for line in stdout.splitlines() if line.startswith("{")]
        return json.loads(lines[0])["token_ids"]

    torchrun = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        "2",
        "--master-port",
        "29533",
    ]
    # both launches at once: the single process and the two ranks share nothing
    single = start([], [sys.executable])
    ranks = start(["--tensor-parallel-size", "2"], torchrun)
    try:
        assert tokens(ranks) == tokens(single)
    finally:
        for proc in (single, ranks):
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
