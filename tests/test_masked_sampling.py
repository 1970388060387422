"""Deferred sampling of grammar-constrained steps: the stand-in queues its step once, on first
use; with async scheduling and without, constrained outputs equal those of filling the masks
inline; a mask fill that fails fails its step's requests and the engine goes on serving."""

from __future__ import annotations

import pytest
import torch

from nanoflow import LLM, SamplingParams
from nanoflow.engine import grammar, model_runner
from nanoflow.engine.masked_sampling import DeferredFlight
from nanoflow.engine.sampling_params import StructuredOutput

REGEX = StructuredOutput("regex", "[a-e]{3,9}")
CPU = torch.device("cpu")


def test_the_stand_in_queues_its_step_once_and_keeps_a_failure():
    calls = []

    class Flight:
        token_ids = "tokens"

    flight = DeferredFlight(["chunk"], lambda: calls.append(1) or Flight(), lambda: True)
    assert flight.chunks == ["chunk"] and calls == []
    assert flight.token_ids == "tokens" and flight.done() is flight.done() and calls == [1]

    def boom():
        raise ValueError("no mask")

    failing = DeferredFlight([], boom, lambda: True)
    failing.poll()  # the failure is kept for the step's readers, not raised to the poller
    for _ in range(2):
        with pytest.raises(ValueError, match="no mask"):
            failing.done()


def test_a_poll_queues_the_step_only_once_its_masks_are_filled():
    calls, filled = [], []
    flight = DeferredFlight([], lambda: calls.append(1) or "flight", lambda: bool(filled))
    flight.poll()
    assert calls == []
    filled.append(True)
    flight.poll()
    flight.poll()
    assert calls == [1] and flight.done() == "flight" and calls == [1]


def _outputs(llm: LLM, seeds: range) -> list[str]:
    params = [SamplingParams(max_tokens=12, temperature=1.0, seed=s, structured=REGEX)
              for s in seeds]  # fmt: skip
    outs = llm.generate(["ab"] * len(params), params, use_tqdm=False)
    return [o.outputs[0].text for o in outs]


GPU = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


@pytest.mark.parametrize(
    ("device", "async_scheduling"),
    [("cpu", False), ("cpu", True), pytest.param("cuda", True, marks=GPU)],
)
def test_deferred_masks_give_the_inline_outputs(monkeypatch, device, async_scheduling):
    """On a GPU the deferred masks are uploaded on the filling thread's own stream."""
    llm = LLM("builtin", device=device, async_scheduling=async_scheduling)
    deferred = _outputs(llm, range(4))
    monkeypatch.setattr(model_runner, "constrained_rows", lambda seqs: {})  # fill inline
    assert _outputs(llm, range(4)) == deferred
    assert all(3 <= len(text) <= 9 and set(text) <= set("abcde") for text in deferred)


@pytest.mark.parametrize("phase", ["mask_rows", "fill_masks"])  # the catch-up, the fill
def test_a_failed_mask_fill_fails_its_requests_and_the_engine_serves_on(monkeypatch, phase):
    llm = LLM("builtin", device="cpu")
    real = getattr(grammar, phase)
    monkeypatch.setattr(grammar, phase, lambda *a, **k: (_ for _ in ()).throw(
        RuntimeError("mask fill broke")))  # fmt: skip
    params = SamplingParams(max_tokens=6, temperature=0.0, structured=REGEX)
    with pytest.raises(RuntimeError, match="failed: RuntimeError: mask fill broke"):
        llm.generate(["ab"], params, use_tqdm=False)
    assert not llm.engine.has_unfinished
    assert llm.engine.blocks.num_free_blocks == llm.engine.blocks.num_blocks
    monkeypatch.setattr(grammar, phase, real)
    (again,) = llm.generate(["ab"], params, use_tqdm=False)
    assert 3 <= len(again.outputs[0].text) <= 9


def test_the_fill_starts_before_submit_returns(monkeypatch):
    """A woken thread gets the interpreter only when the running one blocks or the switch
    interval ends; with the interval at a second, a fill that began after ``submit`` returned
    would not have begun by the time the caller looks."""
    import sys

    from nanoflow.engine.masked_sampling import MaskFiller

    entered = []
    monkeypatch.setattr(grammar, "mask_rows", lambda *args, **kwargs: "rows")
    monkeypatch.setattr(grammar, "fill_masks", lambda rows: entered.append(rows) or "masks")
    filler, interval = MaskFiller(), sys.getswitchinterval()
    try:
        filler.submit({}, 1, 32, CPU).result()  # the thread exists from here on
        entered.clear()
        sys.setswitchinterval(1.0)
        masks = filler.submit({}, 1, 32, CPU)
        assert entered == ["rows"]
        assert masks.result().for_current_stream() == "masks"
    finally:
        sys.setswitchinterval(interval)
        filler.shutdown()
