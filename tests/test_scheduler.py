"""Scheduler and block manager invariants under random add / step / abort sequences."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from nanoflow.engine.block_manager import BlockManager
from nanoflow.engine.sampling_params import SamplingParams
from nanoflow.engine.scheduler import Scheduler
from nanoflow.engine.sequence import Sequence, SequenceStatus

actions = st.lists(
    st.one_of(
        st.tuples(st.just("add"), st.integers(1, 40), st.integers(1, 12)),
        st.tuples(st.just("step"), st.just(0), st.just(0)),
        st.tuples(st.just("abort"), st.integers(0, 30), st.just(0)),
        st.tuples(st.just("preempt"), st.integers(0, 30), st.just(0)),
    ),
    max_size=60,
)


def _step(scheduler: Scheduler, budget: int, kv: dict | None = None) -> list[Sequence]:
    """One fake iteration: plan, check the plan, commit, append a token to samplers. ``kv``
    models the cache's content ((block, offset) -> token): every token a chunk attends to must
    hold the sequence's own token, and no block a chunk writes may be another's."""
    plan = scheduler.plan()
    if kv is not None:  # the block copies to and from host slots, in order
        for copy in plan.copies:
            size = scheduler.blocks.block_size
            if copy.to_host:
                for i in range(size):
                    kv[("host", copy.slot, i)] = kv.get((copy.block, i))
            else:
                for i in range(size):
                    kv[(copy.block, i)] = kv.get(("host", copy.slot, i))
    assert plan.num_tokens <= budget
    ids = [c.seq.request_id for c in plan.chunks]
    assert len(ids) == len(set(ids)), "a sequence scheduled twice in one iteration"
    size = scheduler.blocks.block_size
    for chunk in plan.chunks:
        seq = chunk.seq
        assert chunk.start == seq.num_computed_tokens
        assert len(seq.block_table) * size >= chunk.start + chunk.num_tokens
        if kv is None:
            continue
        tokens = seq.all_token_ids
        for p in range(chunk.start):
            assert kv.get((seq.block_table[p // size], p % size)) == tokens[p], "stale prefix"
        written = {
            seq.block_table[p // size] for p in range(chunk.start, chunk.start + chunk.num_tokens)
        }
        others = {b for s in scheduler.running if s is not seq for b in s.block_table}
        assert not written & others, "a chunk writes a block another sequence reads"
        for p in range(chunk.start, chunk.start + chunk.num_tokens):
            kv[(seq.block_table[p // size], p % size)] = tokens[p]
    samplers = [c.seq for c in plan.chunks if c.samples]
    scheduler.commit(plan)
    for seq in samplers:
        seq.output_token_ids.append(7)
        if len(seq.output_token_ids) >= seq.params.max_tokens:
            scheduler.finish(seq, "length")
    return samplers


def _prompt(length: int, variant: int) -> list[int]:
    """Prompts that share prefixes of many lengths: a common head, then a variant's tail."""
    head = length * (variant % 4) // 4
    return ([1, 2, 3, 4, 5, 6, 7] * 6)[:head] + [10 + variant % 3] * (length - head)


@settings(max_examples=150, deadline=None)
@given(
    actions=actions,
    budget=st.integers(1, 32),
    num_blocks=st.integers(8, 24),
    block_size=st.sampled_from([2, 4, 8]),
    expected=st.sampled_from([None, 1, 4]),
    prefix_caching=st.booleans(),
    host_slots=st.sampled_from([0, 1, 3, 16]),
)
def test_random_traffic_keeps_invariants(
    actions, budget, num_blocks, block_size, expected, prefix_caching, host_slots
):
    host_slots = host_slots if prefix_caching else 0
    blocks = BlockManager(num_blocks, block_size, prefix_caching, host_slots)
    scheduler = Scheduler(blocks, budget, max_num_seqs=6, expected_output_len=expected)
    capacity = num_blocks * block_size
    all_seqs: list[Sequence] = []
    kv: dict = {}
    for kind, a, b in actions:
        if kind == "add":
            prompt_len = min(a, capacity - b)
            if prompt_len < 1:
                continue
            prompt = _prompt(prompt_len, a + b)
            seq = Sequence(f"r{len(all_seqs)}", prompt, SamplingParams(max_tokens=b))
            all_seqs.append(seq)
            scheduler.add(seq)
        elif kind == "step":
            _step(scheduler, budget, kv)
        elif kind == "abort" and all_seqs:
            scheduler.abort(all_seqs[a % len(all_seqs)].request_id)
        elif kind == "preempt" and scheduler.running:
            scheduler.preempt(scheduler.running[a % len(scheduler.running)])
        tracked = [s.request_id for s in list(scheduler.waiting) + scheduler.running]
        assert len(tracked) == len(set(tracked)), "a request is queued twice"
        used = {b for s in scheduler.running for b in s.block_table}
        assert len(used) + blocks.num_free_blocks == num_blocks, "a block leaked"
    for _ in range(10_000):
        if not scheduler.has_unfinished:
            break
        _step(scheduler, budget, kv)
    assert not scheduler.has_unfinished, "requests never finished (lost or deadlocked)"
    for seq in all_seqs:
        assert seq.status is SequenceStatus.FINISHED
        if seq.finish_reason == "length":
            assert len(seq.output_token_ids) == seq.params.max_tokens
    assert blocks.num_free_blocks == num_blocks


def test_decodes_come_first_and_prompts_fill_the_budget():
    scheduler = Scheduler(BlockManager(64, 4), max_num_batched_tokens=10, max_num_seqs=8)
    short = Sequence("short", [1, 2, 3], SamplingParams(max_tokens=5))
    scheduler.add(short)
    _step(scheduler, 10)
    long = Sequence("long", list(range(1, 30)), SamplingParams(max_tokens=5))
    scheduler.add(long)
    plan = scheduler.plan()
    assert [c.seq.request_id for c in plan.decodes] == ["short"]
    assert [(c.seq.request_id, c.num_tokens) for c in plan.prefills] == [("long", 9)]


def test_preempted_request_is_recomputed_not_dropped():
    blocks = BlockManager(5, 2)
    scheduler = Scheduler(blocks, 16, 8, expected_output_len=1)
    a = Sequence("a", [1, 2, 3], SamplingParams(max_tokens=4))
    b = Sequence("b", [4, 5, 6], SamplingParams(max_tokens=4))
    scheduler.add(a)
    scheduler.add(b)
    preempted = []
    while scheduler.has_unfinished:
        plan_preempted = scheduler.plan()
        preempted += plan_preempted.preempted
        scheduler.commit(plan_preempted)
        for c in plan_preempted.chunks:
            if c.samples:
                c.seq.output_token_ids.append(9)
                if len(c.seq.output_token_ids) == 4:
                    scheduler.finish(c.seq, "length")
    assert [s.request_id for s in preempted][:1] == ["b"]
    assert a.output_token_ids == b.output_token_ids == [9] * 4
    assert blocks.num_free_blocks == 5


class PeakSumScheduler(Scheduler):
    """Admission as if every request reached its peak at the same moment."""

    def _admits(self, lives: list[tuple[int, int]]) -> bool:
        def peak(s: Sequence) -> int:
            return self.blocks.blocks_for(self._expected_length(s))

        candidate = self.waiting[0]  # the plan admits from the queue's head
        return sum(peak(s) for s in self.running) + peak(candidate) <= self.blocks.num_blocks


def _drain(scheduler: Scheduler, admitted: list[int] | None = None) -> tuple[int, int]:
    """Run every request to its max_tokens; (iterations, preemptions). ``admitted`` gets how
    many requests each plan took from the queue."""
    iterations = preempted = 0
    while scheduler.has_unfinished:
        waiting = len(scheduler.waiting)
        plan = scheduler.plan()
        if admitted is not None:
            admitted.append(waiting - len(scheduler.waiting))
        iterations += 1
        preempted += len(plan.preempted)
        scheduler.commit(plan)
        for chunk in plan.chunks:
            if chunk.samples:
                chunk.seq.output_token_ids.append(5)
                if len(chunk.seq.output_token_ids) == chunk.seq.params.max_tokens:
                    scheduler.finish(chunk.seq, "length")
    return iterations, preempted


def test_admission_by_predicted_usage_over_time_beats_summing_peaks():
    """Requests at different stages peak at different times: predicting usage step by step
    keeps more requests running than summing their peaks, with no preemption when the output
    lengths are known."""
    import random

    rng = random.Random(0)
    lengths = [(rng.randint(4, 40), rng.randint(4, 60)) for _ in range(80)]

    def run(kind: type[Scheduler]) -> tuple[int, int]:
        blocks = BlockManager(96, 4)
        scheduler = kind(blocks, max_num_batched_tokens=64, max_num_seqs=1000)
        for i, (prompt, output) in enumerate(lengths):
            scheduler.add(Sequence(f"r{i}", [3] * prompt, SamplingParams(max_tokens=output)))
        result = _drain(scheduler)
        assert blocks.num_free_blocks == 96
        return result

    over_time, preempted = run(Scheduler)
    summed, _ = run(PeakSumScheduler)
    assert preempted == 0
    assert over_time < summed


def test_prefixes_evicted_to_host_come_back_with_their_content():
    """Conversations that outgrow a small GPU cache: earlier rounds' prefix blocks go to host
    slots and are copied back (the fake cache checks every attended token's content)."""
    import random

    rng = random.Random(0)
    blocks = BlockManager(num_blocks=10, block_size=2, prefix_caching=True, host_slots=12)
    scheduler = Scheduler(blocks, max_num_batched_tokens=8, max_num_seqs=2)
    conversations = [[100 * c + i for i in range(16)] for c in range(4)]
    kv: dict = {}
    for turn in range(40):
        history = conversations[rng.randrange(4)]
        seq = Sequence(f"t{turn}", history[: rng.randrange(5, 17)], SamplingParams(max_tokens=2))
        scheduler.add(seq)
        while scheduler.has_unfinished:
            _step(scheduler, 8, kv)
    assert blocks.host_tokens_restored > 0 and blocks.cached_tokens_served > 0
    assert blocks.num_free_blocks == blocks.num_blocks


class ResortingScheduler(Scheduler):
    """The admission test as it was first written: every candidate re-sorts the running
    requests' lives from scratch."""

    def _admits(self, lives: list[tuple[int, int]]) -> bool:
        seq = self.waiting[0]
        fresh = [(max(0, self._expected_length(s) - s.num_tokens), s.num_tokens)
                 for s in self.running]  # fmt: skip
        fresh.append((self._expected_length(seq) - len(seq.prompt_token_ids),
                      len(seq.prompt_token_ids)))  # fmt: skip
        fresh.sort(reverse=True)
        alive = 0
        for count, (remaining, now) in enumerate(fresh, start=1):
            alive += now
            size = self.blocks.block_size
            if (alive + count * (remaining + size - 1)) // size > self.blocks.num_blocks:
                return False
        return True


def test_admission_forecast_sorted_once_decides_as_resorting_each_candidate():
    """Inserting each candidate into one sorted forecast admits exactly the requests that
    re-sorting everything for every candidate admits, iteration by iteration."""
    import random

    rng = random.Random(1)
    lengths = [(rng.randint(2, 50), rng.randint(1, 70)) for _ in range(120)]

    def admitted_per_iteration(kind: type[Scheduler]) -> list[int]:
        scheduler = kind(BlockManager(150, 4), max_num_batched_tokens=96, max_num_seqs=40)
        for i, (prompt, output) in enumerate(lengths):
            scheduler.add(Sequence(f"r{i}", [3] * prompt, SamplingParams(max_tokens=output)))
        counts: list[int] = []
        _drain(scheduler, counts)
        return counts

    fast, reference = admitted_per_iteration(Scheduler), admitted_per_iteration(ResortingScheduler)
    assert fast == reference
    assert sum(fast) >= len(lengths) and max(fast) > 1  # several admitted in one plan
