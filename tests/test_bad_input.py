"""Bad input fails with a message that names the problem, and leaves the engine serving."""

from __future__ import annotations

import json
import shutil

import pytest

from nanoflow import LLM, SamplingParams
from nanoflow.errors import CheckpointError, ConfigError, RequestError
from nanoflow.models.spec import ModelSpec


@pytest.fixture(scope="module")
def llm():
    return LLM("builtin", max_model_len=64)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_tokens": -3}, "max_tokens"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"temperature": -1.0}, "temperature"),
        ({"top_k": -1}, "top_k"),
    ],
)
def test_bad_sampling_params(kwargs, message):
    with pytest.raises(RequestError, match=message):
        SamplingParams(**kwargs)


def test_bad_prompts_fail_alone(llm):
    with pytest.raises(RequestError, match="empty"):
        llm.generate([[]], SamplingParams(max_tokens=2))
    with pytest.raises(RequestError, match="context"):
        llm.generate([[5] * 70], SamplingParams(max_tokens=2))
    with pytest.raises(RequestError, match="empty"):
        llm.engine.add_request("x", [], SamplingParams())
    good = llm.generate(["Hello"], SamplingParams(max_tokens=3, ignore_eos=True), use_tqdm=False)
    assert len(good[0].outputs[0].token_ids) == 3
    assert llm.engine.blocks.num_free_blocks == llm.engine.blocks.num_blocks


def test_unknown_model_name():
    with pytest.raises(ConfigError, match="unknown model 'llama-9-1b'"):
        LLM("llama-9-1b")


def test_registry_model_needs_dummy_weights():
    with pytest.raises(ConfigError, match="dummy"):
        LLM("llama-2-7b", device="cpu")


def _copy_checkpoint(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_missing_tensor_is_named(llama_checkpoint, tmp_path):
    from safetensors.torch import load_file, save_file

    folder = _copy_checkpoint(llama_checkpoint[0], tmp_path / "ck")
    weights = load_file(folder / "model.safetensors")
    del weights["model.layers.1.mlp.down_proj.weight"]
    save_file(weights, folder / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"model\.layers\.1\.mlp\.down_proj\.weight"):
        LLM(str(folder), device="cpu")


def test_mismatched_tensor_is_named(llama_checkpoint, tmp_path):
    from safetensors.torch import load_file, save_file

    folder = _copy_checkpoint(llama_checkpoint[0], tmp_path / "ck")
    weights = load_file(folder / "model.safetensors")
    weights["model.norm.weight"] = weights["model.norm.weight"][:10].clone()
    save_file(weights, folder / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"model\.norm\.weight has shape"):
        LLM(str(folder), device="cpu")


def test_truncated_checkpoint(llama_checkpoint, tmp_path):
    folder = _copy_checkpoint(llama_checkpoint[0], tmp_path / "ck")
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="model.safetensors"):
        LLM(str(folder), device="cpu")


def test_bad_config(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        ModelSpec.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2", "hidden_size": 8}))
    with pytest.raises(ConfigError):
        ModelSpec.from_pretrained(tmp_path)
