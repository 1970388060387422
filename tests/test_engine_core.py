"""EngineCore's public seams: the per-token hook and the stats reset."""

from __future__ import annotations

from nanoflow.config import EngineConfig
from nanoflow.engine.engine_core import EngineCore
from nanoflow.engine.sampling_params import SamplingParams


def _run(engine: EngineCore) -> dict[str, str | None]:
    errors = {}
    while engine.has_unfinished:
        for out in engine.step():
            if out.finished:
                errors[out.request_id] = out.error
    return errors


def test_a_raising_token_hook_fails_only_its_request():
    def hook(seq, token: int) -> None:
        if seq.request_id == "bad":
            raise RuntimeError("no")

    engine = EngineCore(EngineConfig(model="builtin", max_num_batched_tokens=32), on_token=hook)
    params = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
    engine.add_request("good", [1, 2, 3], params)
    engine.add_request("bad", [4, 5, 6], params)
    errors = _run(engine)
    assert errors["good"] is None
    assert errors["bad"] == "RuntimeError: no"
    engine.shutdown()


def test_reset_stats_counts_from_there_on():
    engine = EngineCore(EngineConfig(model="builtin", max_num_batched_tokens=32))
    params = SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True)
    engine.add_request("a", [1, 2, 3], params)
    _run(engine)
    assert engine.stats.iterations > 0
    engine.reset_stats()
    assert engine.stats.iterations == 0 and engine.stats.tokens == 0
    engine.add_request("b", [1, 2], params)
    _run(engine)
    assert engine.stats.tokens == 2 + 3 - 1  # the prompt, then one token per later decode
    engine.shutdown()
