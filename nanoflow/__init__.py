"""nanoflow: LLM serving that overlaps compute-, memory- and network-bound work inside one GPU."""

from nanoflow.engine.llm import LLM, CompletionOutput, GenerationOutput
from nanoflow.engine.sampling_params import SamplingParams

__all__ = ["LLM", "CompletionOutput", "GenerationOutput", "SamplingParams"]
__version__ = "0.1.0"
