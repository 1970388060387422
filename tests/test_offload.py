"""Weight offload: the prefetch order and slot reuse (pure bookkeeping, and through a logging
copier in a real engine), and greedy tokens identical with and without offload."""

from __future__ import annotations

import itertools

import pytest
import torch

from nanoflow import LLM, SamplingParams
from nanoflow.config import EngineConfig
from nanoflow.errors import ConfigError
from nanoflow.models.offload import (
    InlineCopier,
    OffloadPlan,
    PrefetchPlanner,
    layer_bytes,
    load_split_weights,
    spread_layers,
)
from nanoflow.models.registry import get_known_model
from nanoflow.models.weights import dummy_weights

PROMPTS = [[5, 17, 99, 3, 42, 8, 64, 12, 7], [11, 23, 5], [3, 9, 27, 81, 14] * 4, [77]]


def _uses(planner: PrefetchPlanner, iterations: int) -> list[tuple[int, list[int]]]:
    n = planner.num_layers
    return [(layer, planner.begin(layer)) for _ in range(iterations) for layer in range(n)]


def test_planner_double_buffers_and_prefetches_across_iterations():
    got = _uses(PrefetchPlanner(num_layers=4, num_slots=2), iterations=2)
    # use u starts: copies for u and u + 1 are issued, u + 1 into the slot u - 1 just left
    assert got == [(0, [0, 1]), (1, [2]), (2, [3]), (3, [4]), (0, [5]), (1, [6]), (2, [7]),
                   (3, [8])]  # fmt: skip


def test_planner_never_overwrites_a_slot_still_in_use():
    for n, slots in itertools.product((1, 2, 3, 5), (1, 2, 3)):
        planner = PrefetchPlanner(n, slots)
        in_slot: dict[int, int] = {}  # slot -> use whose weights it holds
        for use in range(4 * n):
            for issued in planner.begin(use % n):
                slot = planner.slot_of(issued % n)
                assert in_slot.get(slot, -1) < use, (n, slots, use)  # its user has launched
                assert issued < use + slots  # never more than the slots ahead
                in_slot[slot] = issued
            assert in_slot[planner.slot_of(use % n)] == use  # the layer finds its own weights


def test_planner_refuses_layers_out_of_order():
    planner = PrefetchPlanner(3, 2)
    planner.begin(0)
    with pytest.raises(RuntimeError, match="out of order"):
        planner.begin(2)


@pytest.mark.parametrize("count, num_layers", [(1, 8), (2, 8), (3, 80), (5, 32), (47, 80), (8, 8)])
def test_spread_layers_spreads_evenly_over_the_depth(count, num_layers):
    """``count`` distinct layers whose gaps (the last one wrapping round to the first) differ
    by at most one layer."""
    layers = spread_layers(count, num_layers)
    assert len(layers) == count and list(layers) == sorted(set(layers))
    assert set(layers) <= set(range(num_layers))
    gaps = [b - a for a, b in itertools.pairwise(layers)] + [layers[0] + num_layers - layers[-1]]
    assert max(gaps) - min(gaps) <= 1


class LoggingCopier(InlineCopier):
    """Copies inline and logs every copy, wait and release with the slot and layer involved."""

    def __init__(self, plan) -> None:
        self.plan = plan
        self.log: list[tuple] = []
        self.events = itertools.count()

    def copy(self, dst, src, after):
        j = next(i for i, h in enumerate(self.plan.host) if h is src)
        slot = next(s for s, t in enumerate(self.plan.slots) if t.data_ptr() == dst.data_ptr())
        super().copy(dst, src, after)
        self.log.append(("copy", j, slot, tuple(after)))
        return ("ready", j)

    def wait(self, event):
        self.log.append(("wait", event))

    def record(self):
        event = next(self.events)
        self.log.append(("release", event))
        return event


def _generate(folder, **kwargs) -> tuple[list[list[int]], LLM]:
    llm = LLM(str(folder), dtype="float32", device="cpu", num_kv_blocks=64, **kwargs)
    params = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)
    outs = llm.generate(PROMPTS, params, use_tqdm=False)
    return [o.outputs[0].token_ids for o in outs], llm


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"offload_fraction": 0.5},
        {"executor": "nanobatch"},
        {"executor": "overlapped"},
        {"max_num_batched_tokens": 8},
    ],
    ids=["all-layers", "half", "two-nano-batches", "alternating-pipeline", "chunked-prefill"],
)
def test_offload_gives_the_same_greedy_tokens(llama_checkpoint, kwargs):
    folder, _ = llama_checkpoint
    base = {k: v for k, v in kwargs.items() if k != "offload_fraction"}
    want, _ = _generate(folder, **base)
    got, llm = _generate(folder, offload_weights="cpu", **kwargs)
    assert got == want
    plan = llm.engine.runner.offload
    assert len(plan.host_layers) == (1 if "offload_fraction" in kwargs else 2)
    slots = {s.data_ptr() for s in plan.slots}
    for i in plan.host_layers:  # an offloaded layer computes from its slot
        assert llm.engine.runner.model.layers[i].w["input_norm"].data_ptr() in slots


@pytest.mark.parametrize("num_slots", [1, 2])
def test_copies_wait_for_the_slot_and_layers_wait_for_their_copy(
    llama_checkpoint, monkeypatch, num_slots
):
    """Through a real engine with two nano-batches: each copy into a slot follows exactly the
    releases of the slot's previous layer (both nano-batches), each layer waits on its own copy."""
    monkeypatch.setattr(OffloadPlan, "num_slots", num_slots)
    folder, _ = llama_checkpoint
    llm = LLM(str(folder), dtype="float32", device="cpu", offload_weights="cpu",
              executor="nanobatch", num_kv_blocks=64)  # fmt: skip
    plan = llm.engine.runner.offload
    copier = plan.copier = LoggingCopier(plan)
    params = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
    llm.generate(PROMPTS, params, use_tqdm=False)
    ready: dict[int, int] = {}  # slot -> layer copied in
    releases: dict[int, list[int]] = {s: [] for s in range(num_slots)}  # since the last copy
    current = None  # slot of the layer whose ops are being launched
    waits = 0
    for entry in copier.log:
        if entry[0] == "copy":
            _, j, slot, after = entry
            assert slot == j % num_slots
            assert list(after) == releases[slot]  # exactly the previous user's releases
            assert len(after) in ((0, 2) if waits == 0 else (2,))  # two nano-batches each
            ready[slot], releases[slot] = j, []
        elif entry[0] == "wait":
            j = entry[1][1]
            assert ready[j % num_slots] == j  # the slot holds this layer's weights
            current = j % num_slots
            waits += 1
        else:
            releases[current].append(entry[1])
    copies = sum(e[0] == "copy" for e in copier.log)
    assert waits > 4 and copies >= waits // 2


def test_config_and_sizes():
    with pytest.raises(ConfigError, match="offload_weights"):
        EngineConfig(offload_weights="gpu")
    with pytest.raises(ConfigError, match="offload_fraction"):
        EngineConfig(offload_weights="cpu", offload_fraction=1.5)
    spec = get_known_model("llama-2-70b")
    per_layer = layer_bytes(spec, torch.bfloat16)
    assert 1.70e9 < per_layer < 1.72e9  # 855.6M parameters in bf16
    assert layer_bytes(spec, torch.bfloat16, tp_size=2) < per_layer / 2 + 1e5


def test_split_dummy_weights_equal_dummy_weights():
    from dataclasses import replace

    small = dict(hidden_size=64, intermediate_size=96, num_layers=3, num_heads=4, num_kv_heads=2)
    spec = replace(get_known_model("llama-2-7b"), head_dim=16, vocab_size=50, **small)
    cpu = torch.device("cpu")
    split = load_split_weights(spec, None, "dummy", cpu, torch.float32, 3, host_layers=(1,))
    for name, t in dummy_weights(spec, cpu, torch.float32, 3).items():
        assert torch.equal(split[name], t), name


def test_alternating_pipeline_reuses_a_slot_only_after_every_nano_batch_released_it(
    tmp_path, monkeypatch
):
    """Four offloaded layers in two slots under the alternating launch order, which starts a
    layer's first nano-batch before the last one has launched the layer before: each copy
    waits for all of its slot's releases (tokens as without offload). One slot cannot serve
    that order, and says so."""
    import transformers
    from conftest import _config

    config = _config("llama3")
    config.num_hidden_layers = 4
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.2)
    model.save_pretrained(tmp_path)
    want, _ = _generate(tmp_path)
    got, llm = _generate(tmp_path, offload_weights="cpu", executor="overlapped")
    assert len(llm.engine.runner.offload.host_layers) == 4
    assert llm.engine.runner.executor.schedule.launch_order == "alternating"
    assert got == want
    monkeypatch.setattr(OffloadPlan, "num_slots", 1)
    with pytest.raises(RuntimeError, match="two slots"):
        _generate(tmp_path, offload_weights="cpu", executor="overlapped")
