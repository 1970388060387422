"""The whole engine on the Triton kernels (Triton's interpreter on CPU): the same parity with
transformers and the same executor agreement as the reference kernels give."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent


@pytest.mark.timeout(600)
def test_engine_parity_and_executors_on_triton_kernels():
    env = {**os.environ, "TRITON_INTERPRET": "1", "NANOFLOW_KERNELS": "triton"}
    parity = TESTS / "test_model_parity.py"
    selection = [
        f"{parity}::test_greedy_generation_matches_transformers[llama3-chunked-prefill]",
        f"{parity}::test_prefill_and_decode_logits_match_transformers[qwen2]",
        f"{TESTS / 'test_executors.py'}::test_executors_agree[llama3-12]",
    ]
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *selection],
        env=env,
        capture_output=True,
        text=True,
        timeout=580,
        cwd=TESTS,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert "3 passed" in proc.stdout
