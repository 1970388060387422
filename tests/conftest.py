"""Shared fixtures: tiny random Hugging Face checkpoints of each supported architecture.

Triton kernels in these tests run on CPU tensors through Triton's interpreter, which must be
switched on before any kernel module is imported (kernels are wrapped at import time).
"""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

TINY = dict(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    bos_token_id=1,
    eos_token_id=2,
)


def _config(arch: str):
    import transformers

    if arch == "llama3":
        return transformers.LlamaConfig(
            **TINY,
            rope_theta=500000.0,
            rope_scaling={
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 64,
            },
        )
    if arch == "mistral":
        return transformers.MistralConfig(**TINY, rope_theta=1000000.0, sliding_window=None)
    if arch == "qwen2":
        return transformers.Qwen2Config(**TINY, rope_theta=1000000.0, tie_word_embeddings=True)
    raise ValueError(arch)


def make_checkpoint(arch: str, folder: Path, shard: bool = False):
    """Save a tiny random model of ``arch`` with ``save_pretrained``; return the HF model."""
    import transformers

    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(_config(arch), dtype=torch.float32)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.2)
    model.eval()
    kwargs = {"max_shard_size": "60KB"} if shard else {}
    model.save_pretrained(folder, **kwargs)
    return model


@pytest.fixture(scope="session", params=["llama3", "mistral", "qwen2"])
def hf_checkpoint(request, tmp_path_factory):
    """(architecture name, checkpoint folder, transformers model) for each architecture."""
    arch = request.param
    folder = tmp_path_factory.mktemp(arch)
    model = make_checkpoint(arch, folder, shard=arch == "llama3")
    return arch, folder, model


@pytest.fixture(scope="session")
def llama_checkpoint(tmp_path_factory):
    folder = tmp_path_factory.mktemp("llama3-single")
    model = make_checkpoint("llama3", folder)
    return folder, model


# One live `nanoflow serve builtin` for the modules that only send it requests (the request
# fields, hostile input): a 256-token context, an API key and a 12 MiB request limit.
SERVER_API_KEY = "input-key"
SERVER_MAX_MODEL_LEN = 256
SERVER_REQUEST_LIMIT = 12 * 1024 * 1024


@pytest.fixture(scope="session")
def request_server():
    from nanoflow.server.launch import ServerProcess

    args = ["builtin", "--max-model-len", str(SERVER_MAX_MODEL_LEN), "--api-key", SERVER_API_KEY]
    with ServerProcess([*args, "--max-request-bytes", str(SERVER_REQUEST_LIMIT)]) as srv:
        yield srv
