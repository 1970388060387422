"""The cyclic garbage collector, kept out of the engine loop (rank 0's and each worker's)."""

from __future__ import annotations

import gc

GC_FIRST_GENERATION_THRESHOLD = 100_000


def quiet_garbage_collector() -> None:
    """Keep Python's cyclic collector out of the engine loop.

    An iteration of ~800 decodes allocates thousands of short-lived objects (chunks, outputs),
    and at the default threshold of 700 each burst set off young-generation collections that
    escalated into full ones walking every request's token lists: about 2 ms of collection per
    iteration on average, in pauses of tens of ms. A young collection now waits for 100,000 net
    new objects, which an iteration's bursts do not reach. (Freezing the heap instead would
    keep an engine that is dropped later, and sits in a reference cycle, alive for good.)
    """
    threshold = gc.get_threshold()
    if threshold[0] < GC_FIRST_GENERATION_THRESHOLD:
        gc.set_threshold(GC_FIRST_GENERATION_THRESHOLD, *threshold[1:])
