"""Per-request block tables on top of the block pool, the cache's memory statistics and a snapshot.

The manager takes the Request itself (not its id): it sees token contents and counts, which is what
prefix hashing (`get_computed_blocks`), shared blocks (`fork`) and a block map need.
"""

from __future__ import annotations

from dataclasses import dataclass

from pagedserve.core.block_pool import BlockPool
from pagedserve.core.kv_events import KVEventLog
from pagedserve.core.prefix_cache import PrefixCacheStats, extend_block_hashes
from pagedserve.core.request import Request


@dataclass
class KVCacheStats:
    total_blocks: int
    used_blocks: int
    free_blocks: int  # cached-but-free blocks included: any of them can be handed out
    block_size: int
    used_slots: int  # slots holding (or about to hold) a token's K/V
    active_requests: int
    cached_blocks: int = 0  # free blocks that still hold a cached prefix
    prefix_cache_queries: int = 0  # since the start, in tokens (see prefix_cache.PrefixCacheStats)
    prefix_cache_hits: int = 0

    @property
    def utilization(self) -> float:
        return self.used_blocks / self.total_blocks if self.total_blocks else 0.0

    @property
    def allocated_slots(self) -> int:
        return self.used_blocks * self.block_size

    @property
    def fragmentation(self) -> float:
        """Internal fragmentation: allocated-but-empty slots over allocated slots."""
        alloc = self.allocated_slots
        return (alloc - self.used_slots) / alloc if alloc else 0.0

    @property
    def prefix_cache_hit_rate(self) -> float:
        return self.prefix_cache_hits / self.prefix_cache_queries if self.prefix_cache_queries else 0.0

    def as_dict(self) -> dict[str, float]:
        return {"total_blocks": self.total_blocks, "used_blocks": self.used_blocks,
                "free_blocks": self.free_blocks, "utilization": self.utilization,
                "fragmentation": self.fragmentation, "active_requests": self.active_requests,
                "cached_blocks": self.cached_blocks, "prefix_cache_queries": self.prefix_cache_queries,
                "prefix_cache_hits": self.prefix_cache_hits, "prefix_cache_hit_rate": self.prefix_cache_hit_rate}


@dataclass
class BlockInfo:
    """One physical block as a block map shows it."""

    block_id: int
    ref_count: int
    owners: list[str]  # request ids whose table holds it
    num_tokens: int  # slots of it that hold (or are about to hold) a token
    state: str  # "used" | "cached" (free, still a prefix-cache hit) | "free"


class KVCacheManager:
    def __init__(self, num_blocks: int, block_size: int, enable_caching: bool = True,
                 kv_events: KVEventLog | None = None) -> None:
        self.block_size = block_size
        self.enable_caching = enable_caching
        # The prefix cache's stored/removed blocks, for a router that routes on them (core/kv_events.py).
        self.kv_events = kv_events
        self.pool = BlockPool(num_blocks, kv_events)
        self.block_tables: dict[str, list[int]] = {}
        self._used_slots: dict[str, int] = {}
        self.prefix_stats = PrefixCacheStats()
        # Copy-on-write copies (source block, destination block) the next forward must do first.
        self._pending_copies: list[tuple[int, int]] = []

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def get_computed_blocks(self, request: Request) -> tuple[list[int], int]:
        """The longest run of cached blocks holding a prefix of the request's tokens, and the tokens
        they cover. Capped one token short of the request's end: its last token is always computed,
        since its logits are what the next token is sampled from. Changes nothing."""
        if not self.enable_caching or request.skip_prefix_cache:
            return [], 0
        extend_block_hashes(request.block_hashes, request.all_token_ids, self.block_size, request.cache_salt)
        hits = []
        for block_hash in request.block_hashes[:(request.num_tokens - 1) // self.block_size]:
            block = self.pool.lookup(block_hash)
            if block is None:
                break
            hits.append(block)
        return hits, len(hits) * self.block_size

    def allocate_slots(self, request: Request, num_new_tokens: int, num_lookahead_tokens: int = 0,
                       new_computed_blocks: list[int] | None = None) -> bool:
        """Make the request's table cover its computed tokens, `num_new_tokens` more, and
        `num_lookahead_tokens` slots beyond them (speculative tokens, or the static policy's reservation
        of prompt + max_tokens). The new tokens count as used slots; lookahead slots do not.

        At admission, `new_computed_blocks` are the cache hits `get_computed_blocks` found: they start
        the table (the caller counts their tokens as computed once this succeeds). A shared block the
        new tokens would write into is copied first (copy on write). All or nothing: returns False and
        changes nothing when the pool is short.
        """
        rid, bs = request.request_id, self.block_size
        hits = new_computed_blocks or []
        table = self.block_tables.get(rid, [])
        assert not (hits and table), "cache hits are taken only at admission"
        first = request.num_computed_tokens + len(hits) * bs  # first slot written this step
        num_tokens = first + num_new_tokens
        # Blocks of the table this step writes into (speculative tokens may reach a second one; a fork
        # shares its parent's lookahead blocks too) that another sequence still holds.
        written = range(first // bs, min(len(table), self.blocks_needed(num_tokens))) if num_new_tokens else ()
        cow = [i for i in written if self.pool.ref_counts[table[i]] > 1]
        need = self.blocks_needed(num_tokens + num_lookahead_tokens) - len(table) - len(hits)
        revived = sum(1 for b in hits if self.pool.ref_counts[b] == 0)  # they leave the free queue
        if max(need, 0) + len(cow) + revived > self.pool.num_free:
            return False
        if hits:
            self.pool.touch(hits)
            table = list(hits)
        if cow:  # this sequence gets its own copies; the others keep reading the originals
            table = list(table)
            for i, private in zip(cow, self.pool.allocate(len(cow)), strict=True):
                self._pending_copies.append((table[i], private))
                self.pool.free([table[i]])
                table[i] = private
        if need > 0:
            table = table + self.pool.allocate(need)
        self.block_tables[rid] = table
        self._used_slots[rid] = num_tokens
        return True

    def cache_computed_blocks(self, request: Request) -> None:
        """After a step: name the request's full blocks whose K/V are now computed, so later requests
        can hit them. Only computed blocks: a block is never a hit before its contents exist."""
        if not self.enable_caching:
            return
        table = self.block_tables.get(request.request_id)
        if not table:
            return
        num_full = min(request.num_computed_tokens, request.num_tokens) // self.block_size
        if num_full <= request.num_offered_blocks:
            return
        extend_block_hashes(request.block_hashes, request.all_token_ids, self.block_size, request.cache_salt)
        start = request.num_offered_blocks
        for block, block_hash in zip(table[start:num_full], request.block_hashes[start:num_full], strict=True):
            self.pool.cache_block(block, block_hash)
        request.num_offered_blocks = num_full

    def record_prefix_query(self, request: Request, num_hit_tokens: int) -> None:
        """Count an admission's lookup (once it succeeded; a retry next step is not a new query)."""
        if self.enable_caching and not request.skip_prefix_cache:
            self.prefix_stats.record(request.num_tokens, num_hit_tokens)

    def take_pending_copies(self) -> list[tuple[int, int]]:
        copies, self._pending_copies = self._pending_copies, []
        return copies

    def fork(self, parent: Request, child: Request) -> int:
        """Give `child` the parent's whole table, shared (one more reference per block), and return the
        tokens it covers, which the child need not compute. The partly filled last block is shared too:
        whichever sequence writes into it first while it is shared gets its own copy (copy on write)."""
        table = self.block_tables.get(parent.request_id, [])
        assert child.request_id not in self.block_tables, f"{child.request_id} already holds blocks"
        self.pool.incref(table)
        self.block_tables[child.request_id] = list(table)
        computed = parent.num_computed_tokens
        self._used_slots[child.request_id] = computed
        return computed

    def free(self, request: Request) -> None:
        request.num_offered_blocks = 0  # a new table (after a preemption) is offered again
        table = self.block_tables.pop(request.request_id, None)
        self._used_slots.pop(request.request_id, None)
        if table:
            if self._pending_copies:  # preempted in the step that copied its block: nobody reads the copy
                mine = set(table)
                self._pending_copies = [(src, dst) for src, dst in self._pending_copies if dst not in mine]
            self.pool.free(table[::-1])

    def reset_prefix_cache(self) -> bool:
        return self.pool.reset_prefix_cache()

    def used_slots(self, request_id: str) -> int:
        """Slots of the request's table that hold (or are about to hold) a token."""
        return self._used_slots.get(request_id, 0)

    def get_block_ids(self, request: Request) -> list[int]:
        return self.block_tables[request.request_id]

    def stats(self) -> KVCacheStats:
        free = self.pool.num_free
        ps = self.prefix_stats
        return KVCacheStats(total_blocks=self.pool.num_blocks, used_blocks=self.pool.num_blocks - free,
                            free_blocks=free, block_size=self.block_size,
                            used_slots=sum(self._block_fill().values()), active_requests=len(self.block_tables),
                            cached_blocks=self.pool.num_cached_free, prefix_cache_queries=ps.queries,
                            prefix_cache_hits=ps.hits)

    def _block_fill(self) -> dict[int, int]:
        """Slots of each held block that hold (or are about to hold) a token. Sharers agree on a
        shared block's fill (a shared partial block is copied before anyone writes it)."""
        bs = self.block_size
        fill: dict[int, int] = {}
        for rid, table in self.block_tables.items():
            used = self._used_slots.get(rid, 0)
            for i, block in enumerate(table):
                fill[block] = max(fill.get(block, 0), min(bs, max(0, used - i * bs)))
        return fill

    def snapshot(self) -> list[BlockInfo]:
        """Every physical block: who holds it, its reference count, how full it is."""
        owners: dict[int, list[str]] = {}
        for rid, table in self.block_tables.items():
            for block in table:
                owners.setdefault(block, []).append(rid)
        fill = self._block_fill()
        bs = self.block_size
        pool = self.pool
        return [BlockInfo(b, pool.ref_counts[b], owners.get(b, []), fill.get(b, bs if pool.block_hashes[b] else 0),
                          "used" if pool.ref_counts[b] else ("cached" if pool.block_hashes[b] else "free"))
                for b in range(pool.num_blocks)]
