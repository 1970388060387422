"""Grammar-constrained steps sample late, so filling their token masks leaves the host free.

A constrained row's mask depends on the token the row sampled one step before, so it can only
be filled once that token is on the host, and the step cannot sample before its mask is on the
GPU. Filled inline, that host work (tens of microseconds a row) sits on the critical path of
every step. Here the mask is filled on a host thread (xgrammar releases the GIL while it fills)
while the main thread plans and prepares the next step, and the step's sampling is queued only
when something first needs its tokens: the next step's launch, or reading its results.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import torch

from nanoflow.engine.sampler import grammar_of
from nanoflow.engine.sequence import Sequence


def constrained_rows(seqs: list[Sequence]) -> dict[int, Any]:
    """Each constrained row's grammar, by row."""
    grammars = {i: grammar_of(seq) for i, seq in enumerate(seqs)}
    return {i: grammar for i, grammar in grammars.items() if grammar is not None}


class MaskFiller:
    """One host thread that fills the token masks of a step's constrained rows."""

    def __init__(self) -> None:
        self._pool: ThreadPoolExecutor | None = None

    def submit(self, grammars: dict[int, Any], num_rows: int, vocab_size: int, pinned: bool
               ) -> Future[torch.Tensor]:  # fmt: skip
        from nanoflow.engine.grammar import token_bitmask

        if self._pool is None:
            self._pool = ThreadPoolExecutor(1, thread_name_prefix="grammar-masks")
        return self._pool.submit(token_bitmask, grammars, num_rows, vocab_size, pinned)

    def shutdown(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None


class DeferredFlight:
    """A launched step whose sampling waits for its masks: it stands for the ``InFlight`` that
    ``finish`` queues, and queues it on first use of anything but its chunks."""

    def __init__(self, chunks: list[Any], finish: Callable[[], Any]) -> None:
        self.chunks = chunks
        self._finish: Callable[[], Any] | None = finish
        self._flight: Any = None
        self._error: Exception | None = None

    def done(self) -> Any:
        """The step's ``InFlight``, its sampling queued now if it was not yet; a failure to
        fill or sample is raised here, on every call."""
        if self._finish is not None:
            finish, self._finish = self._finish, None
            try:
                with torch.inference_mode():
                    self._flight = finish()
            except Exception as exc:  # kept: each reader of this step learns it failed
                self._error = exc
        if self._error is not None:
            raise self._error
        return self._flight

    def __getattr__(self, name: str) -> Any:
        return getattr(self.done(), name)
