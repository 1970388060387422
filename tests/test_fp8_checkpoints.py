"""FP8 checkpoints as Hugging Face users download them, written here from the tiny Llama:
``quant_method: fp8`` (per-tensor ``weight_scale``, static ``input_scale``) and compressed-tensors
FP8 (per-tensor or per-channel ``weight_scale``), single-file and sharded; schemes nanoflow
cannot run fail naming the field."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from nanoflow import LLM, SamplingParams
from nanoflow.errors import CheckpointError
from nanoflow.kernels.fp8_linear import FP8_DTYPE, Fp8Weight, quantize_weight
from nanoflow.models.quantization import checkpoint_fp8, is_quantized_linear
from nanoflow.models.spec import ModelSpec
from nanoflow.models.weights import load_safetensors

PROMPTS = [[5, 17, 99, 3, 42, 8, 64, 12, 7], [11, 23, 5]]


def _compressed_tensors(strategy: str, static_input: bool) -> dict:
    acts = {"num_bits": 8, "type": "float", "symmetric": True}
    acts |= {"strategy": "tensor", "dynamic": False} if static_input else {"strategy": "token"}
    weights = {"num_bits": 8, "type": "float", "symmetric": True, "strategy": strategy}
    return {
        "quant_method": "compressed-tensors",
        "format": "float-quantized",
        "config_groups": {
            "group_0": {"targets": ["Linear"], "weights": weights, "input_activations": acts}
        },
        "ignore": ["lm_head"],
    }


VLLM_FP8 = {"quant_method": "fp8", "activation_scheme": "static", "ignored_layers": ["lm_head"]}


def _fp8_tensors(w: torch.Tensor, per_channel: bool) -> tuple[torch.Tensor, torch.Tensor]:
    if per_channel:
        q = quantize_weight(w)
        return q.data, q.scale[:, None]  # compressed-tensors stores [N, 1]
    scale = w.abs().amax() / torch.finfo(FP8_DTYPE).max
    return (w / scale).to(FP8_DTYPE), scale.reshape(())


def write_fp8_checkpoint(
    source: Path, folder: Path, quant_config: dict, per_channel: bool, shards: int = 1
) -> dict[str, torch.Tensor]:
    """The float checkpoint in ``source`` with its dense GEMM weights as e4m3 + scales, split
    over ``shards`` files with an index when more than one; returns what was written."""
    folder.mkdir()
    tensors: dict[str, torch.Tensor] = {}
    for name, t in load_file(str(source / "model.safetensors")).items():
        if not is_quantized_linear(name):
            tensors[name] = t
            continue
        tensors[name], tensors[name + "_scale"] = _fp8_tensors(t, per_channel)
        tensors[name.removesuffix("weight") + "input_scale"] = torch.tensor(0.01)
    config = json.loads((source / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(config | {"quantization_config": quant_config}))
    names = sorted(tensors)
    files = [f"model-{i + 1:05d}-of-{shards:05d}.safetensors" for i in range(shards)]
    weight_map = {}
    for i, f in enumerate(files if shards > 1 else ["model.safetensors"]):
        part = {n: tensors[n].contiguous() for n in names[i::shards]}
        save_file(part, str(folder / f))
        weight_map |= {n: f for n in part}
    if shards > 1:
        index = {"metadata": {}, "weight_map": weight_map}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    return tensors


def _greedy(folder: Path, **kwargs) -> list[list[int]]:
    llm = LLM(str(folder), dtype="float32", device="cpu", **kwargs)
    params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    return [o.outputs[0].token_ids for o in llm.generate(PROMPTS, params, use_tqdm=False)]


@pytest.mark.parametrize(
    "quant_config, per_channel, shards",
    [
        (VLLM_FP8, False, 1),
        (VLLM_FP8, False, 3),
        (_compressed_tensors("tensor", static_input=True), False, 1),
        (_compressed_tensors("channel", static_input=False), True, 2),
    ],
    ids=["fp8-tensor", "fp8-tensor-sharded", "ct-tensor-static", "ct-channel-sharded"],
)
def test_fp8_checkpoints_load_their_e4m3_weights_and_scales(
    llama_checkpoint, tmp_path, quant_config, per_channel, shards
):
    source, _ = llama_checkpoint
    folder = tmp_path / "fp8"
    written = write_fp8_checkpoint(source, folder, quant_config, per_channel, shards)
    assert checkpoint_fp8(folder) is not None
    spec = ModelSpec.from_pretrained(folder)
    loaded = load_safetensors(spec, folder, torch.device("cpu"), torch.float32)
    name = "model.layers.1.mlp.down_proj.weight"
    w = loaded[name]
    assert isinstance(w, Fp8Weight)
    assert torch.equal(w.data.view(torch.uint8), written[name].view(torch.uint8))
    assert torch.equal(w.scale, written[name + "_scale"].float().flatten().expand(w.shape[0]))
    assert isinstance(loaded["model.embed_tokens.weight"], torch.Tensor)
    assert not any(n.endswith("_scale") for n in loaded)
    _greedy(folder)  # the engine runs it (FP8 implied by the checkpoint)


def test_a_per_channel_checkpoint_runs_like_quantizing_the_float_one(llama_checkpoint, tmp_path):
    """Its scales are the ones load-time quantization computes, so the tokens are the same."""
    source, _ = llama_checkpoint
    folder = tmp_path / "fp8"
    write_fp8_checkpoint(source, folder, _compressed_tensors("channel", False), True)
    assert _greedy(folder) == _greedy(source, quantization="fp8")


def _with_config(source: Path, folder: Path, quant_config: dict) -> Path:
    shutil.copytree(source, folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(config | {"quantization_config": quant_config}))
    return folder


def _ct_group(**weights) -> dict:
    config = _compressed_tensors("channel", static_input=False)
    config["config_groups"]["group_0"]["weights"] |= weights
    return config


@pytest.mark.parametrize(
    "quant_config, field",
    [
        (VLLM_FP8 | {"weight_block_size": [128, 128]}, "weight_block_size"),
        (VLLM_FP8 | {"activation_scheme": "per-head"}, "activation_scheme"),
        (_ct_group(type="int"), "config_groups.group_0.weights.num_bits/type"),
        (_ct_group(num_bits=4), "config_groups.group_0.weights.num_bits/type"),
        (_ct_group(strategy="block"), "config_groups.group_0.weights.strategy"),
        (_ct_group(strategy="group"), "config_groups.group_0.weights.strategy"),
        (_ct_group(symmetric=False), "config_groups.group_0.weights.symmetric"),
        (_compressed_tensors("channel", False) | {"format": "pack-quantized"}, "format"),
        ({"quant_method": "awq", "bits": 4}, "quant_method"),
    ],
    ids=["block", "act-scheme", "int8", "int4", "ct-block", "ct-group", "asym", "packed", "awq"],
)
def test_unsupported_schemes_name_the_field(llama_checkpoint, tmp_path, quant_config, field):
    source, _ = llama_checkpoint
    folder = _with_config(source, tmp_path / "bad", quant_config)
    with pytest.raises(CheckpointError, match=re.escape(f"quantization_config.{field} =")):
        LLM(str(folder), dtype="float32", device="cpu")


def test_int8_activations_are_refused(llama_checkpoint, tmp_path):
    config = _compressed_tensors("channel", static_input=False)
    config["config_groups"]["group_0"]["input_activations"]["type"] = "int"
    folder = _with_config(llama_checkpoint[0], tmp_path / "bad", config)
    with pytest.raises(CheckpointError, match="input_activations.num_bits/type"):
        checkpoint_fp8(folder)


def test_an_fp8_weight_without_its_scale_is_refused(llama_checkpoint, tmp_path):
    source, _ = llama_checkpoint
    folder = tmp_path / "fp8"
    tensors = write_fp8_checkpoint(source, folder, VLLM_FP8, per_channel=False)
    del tensors["model.layers.0.self_attn.o_proj.weight_scale"]
    save_file(tensors, str(folder / "model.safetensors"))
    spec = ModelSpec.from_pretrained(folder)
    with pytest.raises(CheckpointError, match="o_proj.weight has no .*weight_scale"):
        load_safetensors(spec, folder, torch.device("cpu"), torch.float32)


def test_a_scale_of_the_wrong_size_is_refused(llama_checkpoint, tmp_path):
    source, _ = llama_checkpoint
    folder = tmp_path / "fp8"
    tensors = write_fp8_checkpoint(source, folder, VLLM_FP8, per_channel=False)
    tensors["model.layers.0.self_attn.o_proj.weight_scale"] = torch.ones(3)
    save_file(tensors, str(folder / "model.safetensors"))
    spec = ModelSpec.from_pretrained(folder)
    with pytest.raises(CheckpointError, match="has 3 values"):
        load_safetensors(spec, folder, torch.device("cpu"), torch.float32)
