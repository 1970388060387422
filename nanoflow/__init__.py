"""nanoflow: LLM serving that overlaps compute-, memory- and network-bound work inside one GPU."""

from __future__ import annotations

import importlib
from typing import Any

# Loaded on first use, so importing a light module (nanoflow.workloads, the CLI's parser) does
# not pull in torch and the engine.
_EXPORTS = {
    "LLM": "nanoflow.engine.llm",
    "CompletionOutput": "nanoflow.engine.llm",
    "GenerationOutput": "nanoflow.engine.llm",
    "SamplingParams": "nanoflow.engine.sampling_params",
}

__all__ = list(_EXPORTS)
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'nanoflow' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
