"""Physical KV blocks: reference counts, an LRU free queue, and the prefix cache's hash → block map.

A block whose reference count drops to 0 goes to the back of the free queue but keeps its contents
and its hash: until a fresh block is needed and it reaches the front, a request with the same prefix
can take it back (`touch`). Allocation pops the least recently freed block and only then forgets
its hash (eviction).
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Protocol


class OutOfBlocksError(RuntimeError):
    pass


class KVEventSink(Protocol):
    """Told when the prefix cache names, forgets or clears blocks (core/kv_events.py's log)."""

    def stored(self, block_hash: bytes) -> None: ...
    def removed(self, block_hash: bytes) -> None: ...
    def cleared(self) -> None: ...


class BlockPool:
    def __init__(self, num_blocks: int, event_sink: KVEventSink | None = None) -> None:
        self.num_blocks = num_blocks
        self.event_sink = event_sink
        self.ref_counts = [0] * num_blocks
        self.block_hashes: list[bytes | None] = [None] * num_blocks
        self._free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))  # front = evicted first
        self._cached: dict[bytes, int] = {}  # hash of a full block → the block holding those tokens
        self.num_cached_free = 0  # free blocks that still hold a hash

    @property
    def num_free(self) -> int:
        """Blocks with no owner, cached ones included (any of them can be handed out)."""
        return len(self._free)

    def allocate(self, n: int) -> list[int]:
        if n > len(self._free):
            raise OutOfBlocksError(f"asked for {n} blocks, {len(self._free)} free")
        blocks = []
        for _ in range(n):
            b, _ = self._free.popitem(last=False)
            if self.block_hashes[b] is not None:
                self.num_cached_free -= 1
                self._evict(b)
            self.ref_counts[b] = 1
            blocks.append(b)
        return blocks

    def incref(self, blocks: list[int]) -> None:
        """Share blocks with one more owner (a fork)."""
        for b in blocks:
            assert self.ref_counts[b] > 0, f"block {b} is free and cannot be shared"
            self.ref_counts[b] += 1

    def touch(self, blocks: list[int]) -> None:
        """Take cache hits: one more owner each, out of the free queue if nobody held them."""
        for b in blocks:
            if self.ref_counts[b] == 0:
                del self._free[b]
                self.num_cached_free -= self.block_hashes[b] is not None
            self.ref_counts[b] += 1

    def free(self, blocks: list[int]) -> None:
        """Drop one owner each. Pass a table tail first: its last blocks are then evicted first, as
        they are the least likely to be shared."""
        for b in blocks:
            assert self.ref_counts[b] > 0, f"block {b} freed twice"
            self.ref_counts[b] -= 1
            if self.ref_counts[b] == 0:
                self._free[b] = None
                self.num_cached_free += self.block_hashes[b] is not None

    # --- the prefix cache -----------------------------------------------------------------------

    def lookup(self, block_hash: bytes) -> int | None:
        return self._cached.get(block_hash)

    def cache_block(self, block: int, block_hash: bytes) -> None:
        """Record that `block` (full, owned) holds the tokens `block_hash` names. A second block with
        the same tokens (computed by two requests at once) stays unnamed: the first one is the hit."""
        if self.block_hashes[block] is None and block_hash not in self._cached:
            self.block_hashes[block] = block_hash
            self._cached[block_hash] = block
            if self.event_sink is not None:
                self.event_sink.stored(block_hash)

    def _evict(self, block: int) -> None:
        block_hash = self.block_hashes[block]
        del self._cached[block_hash]
        self.block_hashes[block] = None
        if self.event_sink is not None:
            self.event_sink.removed(block_hash)

    def reset_prefix_cache(self) -> bool:
        """Forget every cached block; refused (False) while any block is in use, as in vLLM, since a
        running request's table would otherwise hold blocks the map no longer names."""
        if len(self._free) != self.num_blocks:
            return False
        for b in range(self.num_blocks):
            self.block_hashes[b] = None
        self._cached.clear()
        self.num_cached_free = 0
        if self.event_sink is not None:
            self.event_sink.cleared()
        return True
