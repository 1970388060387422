"""Continuous batching under a fixed per-iteration token budget (Dynamic SplitFuse).

Every running decode contributes one token, then prompt chunks fill the rest of the budget: a long
prompt is split over iterations, short ones are packed whole. New requests are admitted while the
predicted peak KV usage of everything running fits the cache; when the cache runs out anyway the
newest requests are preempted and later recomputed, never dropped.
"""

from __future__ import annotations

import bisect
from collections import deque
from dataclasses import dataclass, field

from nanoflow.engine.block_manager import BlockCopy, BlockManager
from nanoflow.engine.sequence import Sequence, SequenceStatus


@dataclass(frozen=True)
class ScheduledChunk:
    """``num_tokens`` tokens of ``seq`` starting at position ``start`` computed this iteration."""

    seq: Sequence
    start: int
    num_tokens: int

    @property
    def samples(self) -> bool:
        """Whether this chunk reaches the end of the sequence, so a new token is sampled."""
        return self.start + self.num_tokens == self.seq.num_tokens


@dataclass
class BatchPlan:
    """One iteration's work: decodes first, then prefill chunks, in the order the model sees."""

    decodes: list[ScheduledChunk] = field(default_factory=list)
    prefills: list[ScheduledChunk] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)
    # block copies to and from host memory, to run before the iteration (even one of no tokens)
    copies: list[BlockCopy] = field(default_factory=list)

    @property
    def chunks(self) -> list[ScheduledChunk]:
        return self.decodes + self.prefills

    @property
    def num_tokens(self) -> int:
        return len(self.decodes) + sum(c.num_tokens for c in self.prefills)

    @property
    def num_prefill_tokens(self) -> int:
        return sum(c.num_tokens for c in self.prefills)

    def __bool__(self) -> bool:
        return bool(self.decodes or self.prefills)


class Scheduler:
    """Decides which tokens of which sequences run in each iteration."""

    def __init__(
        self,
        block_manager: BlockManager,
        max_num_batched_tokens: int,
        max_num_seqs: int,
        expected_output_len: int | None = None,
    ) -> None:
        if max_num_batched_tokens < 1 or max_num_seqs < 1:
            raise ValueError("max_num_batched_tokens and max_num_seqs must be positive")
        self.blocks = block_manager
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_num_seqs = max_num_seqs
        self.expected_output_len = expected_output_len
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def abort(self, request_id: str) -> Sequence | None:
        """Remove a request wherever it is; its blocks return to the pool at once."""
        for seq in list(self.waiting) + self.running:
            if seq.request_id == request_id:
                self.finish(seq, "abort")
                return seq
        return None

    def finish(self, seq: Sequence, reason: str) -> None:
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.blocks.free(seq)
        seq.finish(reason)

    @property
    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def plan(self) -> BatchPlan:
        plan = BatchPlan()
        budget = self.max_num_batched_tokens
        scheduled: set[str] = set()
        for seq in list(self.running):
            if budget == 0:
                break
            if seq.status is not SequenceStatus.RUNNING or seq.finishing or not seq.is_decoding:
                continue
            if not self._make_room(seq, seq.num_computed_tokens + 1, scheduled, plan):
                continue
            plan.decodes.append(ScheduledChunk(seq, seq.num_computed_tokens, 1))
            scheduled.add(seq.request_id)
            budget -= 1
        for seq in list(self.running):
            if budget == 0:
                break
            if (
                seq.request_id in scheduled
                or seq.status is not SequenceStatus.RUNNING
                or seq.finishing
            ):
                continue
            budget -= self._schedule_prefill(seq, budget, plan, scheduled)
        forecast: list[tuple[int, int]] | None = None  # built at the first admission
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            if forecast is None:
                forecast = sorted(self._life(s, s.num_tokens) for s in self.running)
            # in place: a candidate turned away ends the admissions of this plan
            bisect.insort(forecast, self._life(seq, len(seq.prompt_token_ids)))
            if self.running and not self._admits(forecast):
                break
            if self._fitting_tokens(seq, budget) == 0:
                break
            self.waiting.popleft()
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            if seq.num_computed_tokens == 0:
                seq.num_cached_tokens = self.blocks.reuse_prefix(seq)
                seq.num_computed_tokens = seq.num_cached_tokens
            budget -= self._schedule_prefill(seq, budget, plan, scheduled)
        movable = [s for s in self.running if not s.finishing]
        if not plan and len(movable) > 1:
            # Every running prompt is stuck mid-prefill on a full cache: free the newest.
            self.preempt(movable[-1], plan)
            retry = self.plan()
            retry.preempted[:0] = plan.preempted
            return retry
        plan.copies = self.blocks.take_copies()
        return plan

    def commit(self, plan: BatchPlan) -> None:
        """Record that the plan's tokens now have K/V in the cache."""
        for chunk in plan.chunks:
            chunk.seq.num_computed_tokens = chunk.start + chunk.num_tokens
        for chunk in plan.prefills:
            if chunk.start < len(chunk.seq.prompt_token_ids):
                self.blocks.remember_prefix(chunk.seq)

    def _schedule_prefill(
        self, seq: Sequence, budget: int, plan: BatchPlan, scheduled: set[str]
    ) -> int:
        n = self._fitting_tokens(seq, budget)
        if n == 0:
            return 0
        self.blocks.grow(seq, seq.num_computed_tokens + n)
        plan.prefills.append(ScheduledChunk(seq, seq.num_computed_tokens, n))
        scheduled.add(seq.request_id)
        return n

    def _fitting_tokens(self, seq: Sequence, budget: int) -> int:
        room = (len(seq.block_table) + self.blocks.num_free_blocks) * self.blocks.block_size
        return max(0, min(seq.num_pending_tokens, budget, room - seq.num_computed_tokens))

    def _expected_length(self, seq: Sequence) -> int:
        expected = seq.params.max_tokens
        if self.expected_output_len is not None:
            expected = min(expected, self.expected_output_len)
        return len(seq.prompt_token_ids) + max(expected, len(seq.output_token_ids) + 1)

    def _life(self, seq: Sequence, num_tokens: int) -> tuple[int, int]:
        """``seq``'s (remaining steps, tokens now) negated, so that an ascending sort puts the
        longest-lived first."""
        return -max(0, self._expected_length(seq) - num_tokens), -num_tokens

    def _admits(self, lives: list[tuple[int, int]]) -> bool:
        """Whether the cache holds every request of ``lives`` (``_life`` of each, sorted) at
        every future step.

        Each request grows one token per step until its expected end, then frees everything, so
        requests at different stages peak at different times: the predicted usage is highest at
        one of those ends. At the end of the k-th longest-remaining request the k longest are
        still alive, each at (tokens now + steps) tokens; prefix sums over the requests sorted
        by remaining steps give every such total in one pass. (Counting each request's own peak
        as if all came at once would keep the batch far smaller than the cache allows.) The
        plan sorts the running requests once and inserts each candidate, so admitting many in
        one iteration costs no sort per candidate.
        """
        size, limit = self.blocks.block_size, self.blocks.num_blocks
        alive_tokens = 0
        for count, (remaining, now) in enumerate(lives, start=1):
            alive_tokens -= now
            # at step ``remaining`` the ``count`` longest-lived requests hold at most these
            # blocks (each request's last block rounded up)
            if (alive_tokens + count * (size - 1 - remaining)) // size > limit:
                return False
        return True

    def _make_room(
        self, seq: Sequence, num_tokens: int, scheduled: set[str], plan: BatchPlan
    ) -> bool:
        """Preempt the newest unscheduled requests until ``seq`` fits; False if ``seq`` itself
        had to go."""
        if num_tokens <= len(seq.block_table) * self.blocks.block_size:
            return True  # most decodes: the last block has room
        while not self.blocks.can_grow(seq, num_tokens):
            victims = [
                s
                for s in self.running
                if s.request_id not in scheduled and s is not seq and not s.finishing
            ]
            victim = victims[-1] if victims else seq
            self.preempt(victim, plan)
            if victim is seq:
                return False
        self.blocks.grow(seq, num_tokens)
        return True

    def preempt(self, seq: Sequence, plan: BatchPlan | None = None) -> None:
        """Send a running request back to the head of the queue, freeing its blocks; it is
        recomputed (prompt + outputs so far) when it runs again."""
        self.running.remove(seq)
        self.blocks.free(seq)
        seq.num_computed_tokens = 0
        seq.num_preemptions += 1
        seq.status = SequenceStatus.WAITING
        self.waiting.appendleft(seq)
        if plan is not None:
            plan.preempted.append(seq)
