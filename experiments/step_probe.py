"""Where a decode step's time goes, with the masks' host work beside the GPU, from cheap probes.

A profiler trace slows the host enough to change what it shows (a constrained step took 12 ms
under one and 10-11 ms without), so this records only what costs microseconds: a CUDA event
on the engine's stream before and after each forward pass and where each step's sampling is
queued, and host clock reads at the grammars' catch-up, at the end of each mask fill and when
the sampling is queued. Per pair of consecutive decode steps:

* ``forward_ms``: the forward pass on the GPU;
* ``stall_ms``: the GPU idle between the forward's end and its sampling (waiting for the host
  to queue it: the masks, or the engine's thread);
* ``tail_ms``: from the sampling's start to the next forward's (the sampling and any gap);
* ``period_ms``: one step, start to start;
* constrained steps also get ``chain_ms`` (catch-up start to fill end: the masks' critical
  chain) and ``engine_late_ms`` (fill end to the sampling queued: how long the masks waited for
  the engine's thread; near zero when the masks were the later of the two).

The probes also give the constrained steps' two host phases in total (the catch-up on the
engine's thread: waiting for the last step's tokens, accepting them, laying out the bitmask;
the fill on the mask thread), name them and the sampling in a profiler trace, and time Python's
cyclic collector (collections by generation, their total and longest pause): a pause on the
engine's thread delays everything queued after it.
"""

from __future__ import annotations

import gc
import statistics
import time
from contextlib import contextmanager
from typing import Any

import torch
from torch.profiler import record_function

from nanoflow.engine import grammar, model_runner


class CollectorTimer:
    """Seconds the cyclic garbage collector ran, how many collections of each generation, and
    the longest one (a ``gc.callbacks`` entry)."""

    def __init__(self) -> None:
        self.seconds = self.longest = 0.0
        self.collections = [0, 0, 0]
        self._started = 0.0

    def __call__(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._started = time.perf_counter()
        else:
            pause = time.perf_counter() - self._started
            self.seconds += pause
            self.longest = max(self.longest, pause)
            self.collections[info["generation"]] += 1


class StepProbe:
    """The probes of one run; ``install`` patches the runner and the grammar module, and puts
    them back on exit."""

    def __init__(self, runner: Any) -> None:
        self.runner = runner
        self.steps: list[dict[str, Any]] = []
        self.timed = runner.device.type == "cuda"
        self.collector = CollectorTimer()
        self.catch_up_seconds = self.fill_seconds = 0.0
        self.fills = 0

    def _event(self) -> torch.cuda.Event | None:
        if not self.timed:
            return None
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    @contextmanager
    def install(self) -> Any:
        runner, forward = self.runner, self.runner.forward
        sample, mask_rows, fill_masks = model_runner.sample, grammar.mask_rows, grammar.fill_masks

        def probed_forward(step: Any) -> torch.Tensor:
            record = {"decode": step.num_tokens == len(step.sampling_chunks),
                      "before": self._event()}  # fmt: skip
            logits = forward(step)
            record["after"] = self._event()
            self.steps.append(record)
            return logits

        def probed_sample(*args: Any, **kwargs: Any) -> Any:
            self.steps[-1].update(sampled_at=time.perf_counter(), sample=self._event())
            with record_function("nanoflow.sample"):
                return sample(*args, **kwargs)

        def probed_mask_rows(*args: Any, **kwargs: Any) -> Any:
            self.steps[-1]["catch_up_at"] = started = time.perf_counter()
            with record_function("nanoflow.grammar.mask_rows"):
                rows = mask_rows(*args, **kwargs)
            self.catch_up_seconds += time.perf_counter() - started
            return rows

        def probed_fill(*args: Any, **kwargs: Any) -> Any:
            started = time.perf_counter()
            with record_function("nanoflow.grammar.fill_masks"):
                filled = fill_masks(*args, **kwargs)
            self.steps[-1]["filled_at"] = time.perf_counter()
            self.fill_seconds += self.steps[-1]["filled_at"] - started
            self.fills += 1
            return filled

        runner.forward, model_runner.sample = probed_forward, probed_sample
        grammar.mask_rows, grammar.fill_masks = probed_mask_rows, probed_fill
        gc.callbacks.append(self.collector)
        try:
            yield self
        finally:
            gc.callbacks.remove(self.collector)
            del runner.forward
            model_runner.sample = sample
            grammar.mask_rows, grammar.fill_masks = mask_rows, fill_masks

    def masks_summary(self) -> dict[str, float]:
        """The constrained steps' catch-up and fill, per step that filled masks (every step,
        prefill ones too), in milliseconds."""
        fills = max(1, self.fills)
        return {"mask_steps": self.fills, "wait_ms_per_step": 1e3 * self.catch_up_seconds / fills,
                "fill_ms_per_step": 1e3 * self.fill_seconds / fills}  # fmt: skip

    def gc_summary(self) -> dict[str, Any]:
        """The collector's pauses during the run, in milliseconds."""
        return {"collections": self.collector.collections,
                "ms_total": 1e3 * self.collector.seconds,
                "ms_max": 1e3 * self.collector.longest}  # fmt: skip

    def summary(self) -> dict[str, dict[str, float]]:
        """Median and mean of each figure over consecutive decode steps, in milliseconds."""
        if self.timed:
            torch.cuda.synchronize()
        figures: dict[str, list[float]] = {}

        def add(name: str, value: float) -> None:
            figures.setdefault(name, []).append(value)

        for step, following in zip(self.steps, self.steps[1:], strict=False):
            if not (step["decode"] and following["decode"] and "sampled_at" in step):
                continue
            if self.timed:
                add("forward_ms", step["before"].elapsed_time(step["after"]))
                add("stall_ms", step["after"].elapsed_time(step["sample"]))
                add("tail_ms", step["sample"].elapsed_time(following["before"]))
                add("period_ms", step["before"].elapsed_time(following["before"]))
            if "filled_at" in step:
                add("chain_ms", 1e3 * (step["filled_at"] - step["catch_up_at"]))
                add("engine_late_ms", 1e3 * (step["sampled_at"] - step["filled_at"]))
        return {
            name: {
                "median": statistics.median(values),
                "mean": statistics.fmean(values),
                "steps": len(values),
            }  # fmt: skip
            for name, values in figures.items()
        }
