"""Tokenizer loading and the text side of requests (chat templates, stop-string trimming)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from nanoflow.errors import ConfigError


def load_tokenizer(path: str | Path | None) -> Any | None:
    """A transformers tokenizer from a folder, or None when the model has none (dummy weights)."""
    if path is None:
        return None
    names = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")
    if Path(path).is_dir() and not any((Path(path) / n).is_file() for n in names):
        return None
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(path))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot load a tokenizer from {path}: {exc}") from None


def decode(tokenizer: Any, token_ids: list[int]) -> str:
    return tokenizer.decode(token_ids, skip_special_tokens=True)
