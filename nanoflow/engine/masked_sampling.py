"""Grammar-constrained steps sample late, so filling their token masks leaves the host free.

A constrained row's mask depends on the token the row sampled one step before, so it can only
be filled once that token is on the host, and the step cannot sample before its mask is on the
GPU. Filled inline, that host work (tens of microseconds a row) sits on the critical path of
every step. Here the main thread catches the grammars up as soon as the step's forward pass is
queued (the last step's tokens come first on the GPU), and a host thread fills the masks in
native code (xgrammar releases the GIL while it fills) while the main thread plans and prepares
the next step; the step's sampling is queued only when something first needs its tokens: the
next step's launch, or reading its results. The filling thread runs no per-row Python: that
would contend for the interpreter with the main thread, costing each hand-off up to the switch
interval. For the same reason the main thread waits, at each submission, until the filling
thread holds the interpreter: a thread woken while another runs Python gets it only when that
one blocks or the switch interval (5 ms) runs out, which would start the fill that much late.
On a GPU the filling thread also uploads the masks, on a stream of its own while the forward
pass runs, so the copy is not left to the step's sampling; and the main thread queues that
sampling at the first of its checkpoints that finds the masks filled.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, NamedTuple

import torch

from nanoflow.engine.sampler import grammar_of
from nanoflow.engine.sequence import Sequence


def constrained_rows(seqs: list[Sequence]) -> dict[int, Any]:
    """Each constrained row's grammar, by row."""
    grammars = {i: grammar_of(seq) for i, seq in enumerate(seqs)}
    return {i: grammar for i, grammar in grammars.items() if grammar is not None}


class FilledMasks(NamedTuple):
    """A step's token masks where the sampling will read them: on the GPU, uploaded on the
    filling thread's stream, ``ready`` once the copy is done (None on the host)."""

    bitmask: torch.Tensor
    ready: torch.cuda.Event | None = None

    def for_current_stream(self) -> torch.Tensor:
        """The masks, safe to read from work queued next on the current stream."""
        if self.ready is not None:
            stream = torch.cuda.current_stream(self.bitmask.device)
            stream.wait_event(self.ready)
            self.bitmask.record_stream(stream)  # its memory is not reused before that work ran
        return self.bitmask


class MaskFiller:
    """One host thread that fills the token masks of a step's constrained rows."""

    def __init__(self) -> None:
        self._pool: ThreadPoolExecutor | None = None
        self._stream: torch.cuda.Stream | None = None

    def submit(self, grammars: dict[int, Any], num_rows: int, vocab_size: int,
               device: torch.device) -> Future[FilledMasks]:  # fmt: skip
        """Catch ``grammars`` up here, then fill their masks on the thread (and upload them to
        ``device``, a GPU); a failure of either is the future's, so it fails the step's
        requests and nothing else."""
        from nanoflow.engine import grammar

        if self._pool is None:
            self._pool = ThreadPoolExecutor(1, thread_name_prefix="grammar-masks")
        on_gpu = device.type == "cuda"
        if on_gpu and self._stream is None:
            self._stream = torch.cuda.Stream(device)
        try:
            rows = grammar.mask_rows(grammars, num_rows, vocab_size, pinned=on_gpu)
        except Exception as exc:  # kept for the step's readers, as a fill's failure is
            failed: Future[FilledMasks] = Future()
            failed.set_exception(exc)
            return failed
        started = threading.Event()

        def fill() -> FilledMasks:
            started.set()  # the main thread goes on once this thread holds the interpreter
            bitmask = grammar.fill_masks(rows)
            if not on_gpu:
                return FilledMasks(bitmask)
            with torch.cuda.stream(self._stream):
                uploaded = FilledMasks(bitmask.to(device, non_blocking=True), torch.cuda.Event())
                uploaded.ready.record()
            return uploaded

        masks = self._pool.submit(fill)
        started.wait()
        return masks

    def shutdown(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None


class DeferredFlight:
    """A launched step whose sampling waits for its masks: it stands for the ``InFlight`` that
    ``finish`` queues, and queues it on first use of anything but its chunks, or at a
    ``poll`` that finds the masks ready."""

    def __init__(self, chunks: list[Any], finish: Callable[[], Any], ready: Callable[[], bool]
                 ) -> None:  # fmt: skip
        self.chunks = chunks
        self._finish: Callable[[], Any] | None = finish
        self._ready = ready
        self._flight: Any = None
        self._error: Exception | None = None

    def poll(self) -> None:
        """Queue the sampling now if the masks are filled, so the GPU finds it queued when the
        forward pass ends; never waits for them."""
        if self._finish is not None and self._ready():
            with contextlib.suppress(Exception):  # kept by done(), raised to the step's readers
                self.done()

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
