"""The collections taken while the host waits for the GPU: only when one is half due, with the
middle generation when it is due, never with the collector off."""

from __future__ import annotations

import gc

import pytest

from nanoflow.engine.host_gc import collect_while_waiting


@pytest.fixture
def collector():
    """A collector with a young threshold of 1000 and the automatic runs off, put back after."""
    threshold, enabled = gc.get_threshold(), gc.isenabled()
    gc.collect()
    gc.set_threshold(1000, 3, 10)
    gc.disable()
    yield
    gc.set_threshold(*threshold)
    if enabled:
        gc.enable()


def _allocate(n: int) -> list:
    return [[] for _ in range(n)]  # containers: each one counts toward the young generation


def test_a_young_collection_is_taken_once_half_due(collector):
    gc.enable()
    gc.collect()
    kept = _allocate(200)
    collect_while_waiting()
    assert gc.get_count()[0] >= 200  # a fifth due: left alone
    kept += _allocate(400)
    collect_while_waiting()
    assert gc.get_count()[0] < 50 and gc.get_count()[1] == 1  # the young generation, taken
    assert len(kept) == 600


def test_the_middle_generation_goes_with_it_when_due(collector):
    gc.enable()
    gc.collect()
    for _ in range(3):
        gc.collect(0)  # three young collections: the middle generation's threshold
    kept = _allocate(600)
    collect_while_waiting()
    assert gc.get_count()[1] == 0 and gc.get_count()[2] == 1
    assert len(kept) == 600


def test_nothing_is_collected_with_the_collector_off(collector):
    gc.collect()
    kept = _allocate(900)
    collect_while_waiting()
    assert gc.get_count()[0] >= 900
    assert len(kept) == 900
