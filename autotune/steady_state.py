"""The iteration the tuner optimises: what a full dense batch holds in the steady state of a
workload, when requests keep arriving and the token budget is always filled."""

from __future__ import annotations

from dataclasses import dataclass

from nanoflow.workloads import load_workload


@dataclass(frozen=True)
class WorkloadShape:
    """Mean prompt and output lengths of a workload, in tokens."""

    input_len: float
    output_len: float

    @classmethod
    def from_workload(cls, name: str, num_requests: int = 2000, seed: int = 0) -> WorkloadShape:
        """``IN/OUT``, a dataset name or a trace file, as ``nanoflow bench`` reads them."""
        requests = load_workload(name, num_requests, seed)
        return cls(
            input_len=sum(r.input_len for r in requests) / len(requests),
            output_len=sum(r.output_len for r in requests) / len(requests),
        )


@dataclass(frozen=True)
class SteadyBatch:
    """One iteration: ``decodes`` one-token decodes over ``decode_context`` cached tokens on
    average, and ``prefill_tokens`` prompt tokens of prompts ``prompt_len`` long."""

    decodes: int
    prefill_tokens: int
    decode_context: float
    prompt_len: float

    @property
    def tokens(self) -> int:
        return self.decodes + self.prefill_tokens

    @property
    def sampled_rows(self) -> int:
        """Rows the LM head runs on: every decode and the prompts that finish this iteration."""
        return self.decodes + round(self.prefill_tokens / max(1.0, self.prompt_len))


def steady_batch(dense_batch_size: int, shape: WorkloadShape) -> SteadyBatch:
    """Each request brings ``input_len`` prefill tokens and ``output_len`` decode tokens, so a
    full budget splits between them in that ratio; a decode's context averages the prompt plus
    half its output."""
    total = shape.input_len + shape.output_len
    decodes = round(dense_batch_size * shape.output_len / total)
    return SteadyBatch(
        decodes=decodes,
        prefill_tokens=dense_batch_size - decodes,
        decode_context=shape.input_len + shape.output_len / 2,
        prompt_len=shape.input_len,
    )
