"""The whole engine on the Triton kernels (Triton's interpreter on CPU): the same parity with
transformers and the same executor agreement as the reference kernels give.

The checks run in this process with every kernel forced to Triton (``set_backend``, the switch
``NANOFLOW_KERNELS=triton`` sets at import); the conftest turns the interpreter on before any
kernel module is imported."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

pytest.importorskip("triton")

import test_executors  # noqa: E402
import test_model_parity  # noqa: E402
from conftest import make_checkpoint  # noqa: E402

from nanoflow import kernels  # noqa: E402


@pytest.fixture
def triton_kernels() -> Iterator[None]:
    kernels.set_backend("triton")
    assert kernels.backend_for(torch.zeros(1)) == "triton"
    yield
    kernels.set_backend("auto")


@pytest.fixture(scope="module")
def qwen2_checkpoint(tmp_path_factory):
    folder = tmp_path_factory.mktemp("qwen2-triton")
    return "qwen2", folder, make_checkpoint("qwen2", folder)


@pytest.mark.timeout(300)
def test_greedy_generation_with_chunked_prefill_matches_transformers(
    llama_checkpoint, triton_kernels
):
    folder, model = llama_checkpoint
    test_model_parity.test_greedy_generation_matches_transformers(
        ("llama3", folder, model), {"max_num_batched_tokens": 8}
    )


@pytest.mark.timeout(300)
def test_prefill_and_decode_logits_match_transformers(qwen2_checkpoint, triton_kernels):
    test_model_parity.test_prefill_and_decode_logits_match_transformers(qwen2_checkpoint)


@pytest.mark.timeout(300)
def test_executors_agree_on_chunked_prompts(llama_checkpoint, triton_kernels):
    """Budget 12 cuts the prompts into chunks that the nano-batch boundaries cut again; four
    tokens per prompt take every sequence through prefill chunks and decodes (the interpreter
    pays for each launch, so fewer decode steps than the reference-kernel test)."""
    folder, _ = llama_checkpoint
    run = {"max_num_batched_tokens": 12, "max_tokens": 4}
    reference = test_executors._generate(folder, "sequential", **run)
    assert test_executors._generate(folder, "nanobatch", **run) == reference
    assert test_executors._generate(folder, "overlapped", **run) == reference
