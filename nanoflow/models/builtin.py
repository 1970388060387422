"""The embedded default model: a tiny Llama with deterministic random weights and a tokenizer
trained locally, written as a normal Hugging Face checkpoint on first use (no download)."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

from nanoflow.models.spec import ModelSpec
from nanoflow.models.weights import dummy_weights

BUILTIN_NAME = "builtin"
_VERSION = "v1"
_VOCAB_SIZE = 512
_SPECIAL_TOKENS = ["<|bos|>", "<|eos|>", "<|user|>", "<|assistant|>", "<|system|>"]
_CHAT_TEMPLATE = (
    "{{ '<|bos|>' }}{% for m in messages %}{{ '<|' + m['role'] + '|>' + m['content'] + '\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)
_CORPUS = """
The engine splits each batch into nano-batches and overlaps compute, memory and network work.
Large language models generate text one token at a time; serving many requests at once keeps the
GPU busy. A paged cache stores keys and values in fixed-size blocks. The quick brown fox jumps over
the lazy dog. Hello, world! How are you today? I am fine, thank you. Once upon a time there was a
small model that lived on a laptop and answered every question with great enthusiasm.
0123456789 + - * / = ( ) [ ] { } < > , . ; : ! ? ' " @ # $ % ^ & _ ~
"""

BUILTIN_SPEC = ModelSpec(
    model_type="llama",
    vocab_size=_VOCAB_SIZE,
    hidden_size=128,
    intermediate_size=352,
    num_layers=4,
    num_heads=4,
    num_kv_heads=2,
    head_dim=32,
    max_position_embeddings=2048,
    rms_norm_eps=1e-5,
    rope_theta=10000.0,
    bos_token_id=0,
    eos_token_ids=(1,),
)


def cache_root() -> Path:
    return Path(os.environ.get("NANOFLOW_CACHE", Path.home() / ".cache" / "nanoflow"))


def _train_tokenizer(folder: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=_VOCAB_SIZE,
        special_tokens=_SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([_CORPUS] * 4, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|bos|>", eos_token="<|eos|>", pad_token="<|eos|>"
    )
    fast.chat_template = _CHAT_TEMPLATE
    fast.save_pretrained(folder)


def builtin_model_path() -> Path:
    """Folder of the built-in checkpoint, created (atomically) the first time it is asked for."""
    target = cache_root() / f"builtin-{_VERSION}"
    if (target / "model.safetensors").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=".builtin-"))
    try:
        _train_tokenizer(staging)
        (staging / "config.json").write_text(json.dumps(BUILTIN_SPEC.to_hf_config(), indent=2))
        weights = dummy_weights(BUILTIN_SPEC, torch.device("cpu"), torch.float32, seed=1234)
        for tensor in weights.values():
            if tensor.ndim == 2:
                tensor.mul_(4.0)  # livelier logits than the 0.02 init, so text varies
        save_file(weights, str(staging / "model.safetensors"))
        try:
            staging.rename(target)
        except OSError:
            if not (target / "model.safetensors").is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target
