"""Paged KV-cache bookkeeping: a free list of fixed-size blocks and per-sequence block tables.

With prefix caching, a full block of prompt tokens whose K/V are computed is remembered by its
content, keyed by its own tokens and a hash of the key of the block before it, so a key names the
whole prefix (two prefixes would have to collide in a 64-bit hash and agree on the block's tokens
to be confused). A later request whose prompt
starts with the same blocks takes them instead of recomputing them; a block counts its users and,
once none is left, stays cached until the space is needed (least recently released first).

With host slots as well (KV offload for multi-round conversations), a cached block that is
evicted is first copied to a slot in host memory, and a later prompt that starts with it gets a
fresh block copied back from there instead of recomputing it. The copies are only recorded here
(``take_copies``); the runner queues them on the GPU ahead of the iteration that needs them.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from typing import NamedTuple

from nanoflow.engine.sequence import Sequence

BlockKey = tuple  # (hash of the previous block's key, or None; tokens of this block)


class BlockCopy(NamedTuple):
    """One block's K/V between the GPU cache and a host slot, in the direction given."""

    to_host: bool
    block: int
    slot: int


class BlockManager:
    """Hands out physical cache blocks; every block comes back when its sequence lets go."""

    def __init__(
        self, num_blocks: int, block_size: int, prefix_caching: bool = False, host_slots: int = 0
    ) -> None:
        if num_blocks <= 0 or block_size <= 0:
            raise ValueError("the KV cache needs at least one block of at least one token")
        if host_slots and not prefix_caching:
            raise ValueError("host slots keep cached prefixes: they need prefix caching")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.prefix_caching = prefix_caching
        self._free: deque[int] = deque(range(num_blocks))
        self._users = [0] * num_blocks
        self._key_of: dict[int, BlockKey] = {}
        self._block_of: dict[BlockKey, int] = {}
        self._idle: OrderedDict[int, None] = OrderedDict()  # cached blocks no sequence uses
        self._host_free: deque[int] = deque(range(host_slots))
        self._host_of: OrderedDict[BlockKey, int] = OrderedDict()  # least recently used first
        self._copies: list[BlockCopy] = []
        self.cached_tokens_served = 0
        self.host_tokens_restored = 0

    @property
    def num_free_blocks(self) -> int:
        """Blocks a sequence can get now (cached ones nobody uses included)."""
        return len(self._free) + len(self._idle)

    @property
    def usage(self) -> float:
        return 1.0 - self.num_free_blocks / self.num_blocks

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def blocks_needed(self, seq: Sequence, num_tokens: int) -> int:
        """Extra blocks ``seq`` needs so that its table covers ``num_tokens`` tokens."""
        return max(0, self.blocks_for(num_tokens) - len(seq.block_table))

    def can_grow(self, seq: Sequence, num_tokens: int) -> bool:
        return self.blocks_needed(seq, num_tokens) <= self.num_free_blocks

    def grow(self, seq: Sequence, num_tokens: int) -> None:
        needed = self.blocks_needed(seq, num_tokens)
        if needed > self.num_free_blocks:
            raise RuntimeError(
                f"KV cache exhausted: {seq.request_id} needs {needed} blocks, "
                f"{self.num_free_blocks} free"
            )
        seq.block_table.extend(self._take() for _ in range(needed))

    def free(self, seq: Sequence) -> None:
        # last block first: eviction then takes a prefix's tail before its head, which every
        # longer match needs
        for block in reversed(seq.block_table):
            self._users[block] -= 1
            if self._users[block] == 0:
                if block in self._key_of:
                    self._idle[block] = None
                else:
                    self._free.append(block)
        seq.block_table = []

    def reuse_prefix(self, seq: Sequence) -> int:
        """Give a sequence with no blocks yet the cached blocks its prompt starts with; returns
        the tokens they hold (always fewer than the sequence's, so one is left to compute)."""
        if not self.prefix_caching or seq.block_table:
            return 0
        blocks = []
        for key in self._prompt_keys(seq, seq.num_tokens - 1):
            block = self._block_of.get(key)
            if block is not None:
                self._idle.pop(block, None)
                self._users[block] += 1
            elif key in self._host_of and self.num_free_blocks:
                block = self._restore(key)
            else:
                break
            blocks.append(block)
        seq.block_table = blocks
        cached = len(blocks) * self.block_size
        self.cached_tokens_served += cached
        return cached

    def remember_prefix(self, seq: Sequence) -> None:
        """Remember the sequence's full prompt blocks whose K/V are computed (by then queued on
        the GPU ahead of any later step that could reuse them)."""
        if not self.prefix_caching:
            return
        for i, key in enumerate(self._prompt_keys(seq, seq.num_computed_tokens)):
            block = seq.block_table[i]
            if block in self._key_of or key in self._block_of:
                continue  # already known, or the same content cached in another block
            self._key_of[block] = key
            self._block_of[key] = block

    def take_copies(self) -> list[BlockCopy]:
        """The copies recorded since the last call, to run in this order before the next
        iteration (the order matters: a slot may be read, then given to another block)."""
        copies, self._copies = self._copies, []
        return copies

    def _restore(self, key: BlockKey) -> int:
        """A fresh block for a prefix block kept in host memory, with the copy back recorded."""
        slot = self._host_of.pop(key)  # out of reach of the eviction ``_take`` may do
        block = self._take()
        self._copies.append(BlockCopy(False, block, slot))
        self._host_of[key] = slot  # still holds the content, now the most recently used
        self._key_of[block] = key
        self._block_of[key] = block
        self.host_tokens_restored += self.block_size
        return block

    def _offload(self, block: int, key: BlockKey) -> None:
        """Keep an evicted block's K/V in a host slot (the least recently used one if none is
        free), unless a slot already holds that content."""
        if key in self._host_of:
            self._host_of.move_to_end(key)
            return
        if self._host_free:
            slot = self._host_free.popleft()
        elif self._host_of:
            _, slot = self._host_of.popitem(last=False)
        else:
            return
        self._host_of[key] = slot
        self._copies.append(BlockCopy(True, block, slot))

    def _prompt_keys(self, seq: Sequence, limit: int) -> list[BlockKey]:
        """Keys of the full prompt blocks within the first ``limit`` tokens (worked out once
        per sequence: they are asked for at every prompt chunk)."""
        size, prompt = self.block_size, seq.prompt_token_ids
        if seq.prompt_block_keys is None:
            keys: list[BlockKey] = []
            parent = None
            for start in range(0, len(prompt) - size + 1, size):
                key = (parent, tuple(prompt[start : start + size]))
                keys.append(key)
                parent = hash(key)
            seq.prompt_block_keys = keys
        return seq.prompt_block_keys[: min(limit, len(prompt)) // size]

    def _take(self) -> int:
        """A free block, else the cached block released longest ago (forgetting its content)."""
        if self._free:
            block = self._free.popleft()
        else:
            block, _ = self._idle.popitem(last=False)
            key = self._key_of.pop(block)
            del self._block_of[key]
            self._offload(block, key)
        self._users[block] = 1
        return block
