"""Per-request block tables on top of the block pool, the cache's memory statistics and a snapshot.

The manager takes the Request itself (not its id): it sees token contents and counts, which is what
prefix hashing (`get_computed_blocks`), shared blocks (`fork`) and a block map need.
"""

from __future__ import annotations

from dataclasses import dataclass

from pagedserve.core.block_pool import BlockPool
from pagedserve.core.request import Request


@dataclass
class KVCacheStats:
    total_blocks: int
    used_blocks: int
    free_blocks: int
    block_size: int
    used_slots: int  # slots holding (or about to hold) a token's K/V
    active_requests: int

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

    def as_dict(self) -> dict[str, float]:
        return {"total_blocks": self.total_blocks, "used_blocks": self.used_blocks,
                "free_blocks": self.free_blocks, "utilization": self.utilization,
                "fragmentation": self.fragmentation, "active_requests": self.active_requests}


@dataclass
class BlockInfo:
    """One physical block as a block map shows it."""

    block_id: int
    ref_count: int
    owners: list[str]  # request ids whose table holds it
    num_tokens: int  # slots of it that hold (or are about to hold) a token, per its first owner
    state: str  # "used" | "free"


class KVCacheManager:
    def __init__(self, num_blocks: int, block_size: int) -> None:
        self.block_size = block_size
        self.pool = BlockPool(num_blocks)
        self.block_tables: dict[str, list[int]] = {}
        self._used_slots: dict[str, int] = {}

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def get_computed_blocks(self, request: Request) -> tuple[list[int], int]:
        """Blocks already holding a prefix of the request's tokens, and how many tokens they cover.

        Nothing is cached across requests yet (prefix caching plugs in here), so a request always
        starts from no computed tokens.
        """
        return [], 0

    def allocate_slots(self, request: Request, num_new_tokens: int, num_lookahead_tokens: int = 0) -> bool:
        """Make the request's table cover its computed tokens, `num_new_tokens` more, and
        `num_lookahead_tokens` slots beyond them (speculative tokens, or the static policy's reservation
        of prompt + max_tokens). The new tokens count as used slots; lookahead slots do not.

        All or nothing: returns False and changes nothing when the pool is short.
        """
        rid = request.request_id
        num_tokens = request.num_computed_tokens + num_new_tokens
        table = self.block_tables.get(rid, [])
        need = self.blocks_needed(num_tokens + num_lookahead_tokens) - len(table)
        if need > self.pool.num_free:
            return False
        if need > 0:
            table = table + self.pool.allocate(need)
        self.block_tables[rid] = table
        self._used_slots[rid] = num_tokens
        return True

    def fork(self, parent: Request, child: Request) -> int:
        """Give `child` the parent's full blocks, shared (one more reference each); returns the tokens
        they cover, which the child need not compute. A partly filled last block is not shared: the
        child writes its own copy of those tokens, so no block is ever written by two sequences."""
        full = self._used_slots.get(parent.request_id, 0) // self.block_size
        shared = self.block_tables.get(parent.request_id, [])[:full]
        assert child.request_id not in self.block_tables, f"{child.request_id} already holds blocks"
        self.pool.incref(shared)
        self.block_tables[child.request_id] = list(shared)
        self._used_slots[child.request_id] = full * self.block_size
        return full * self.block_size

    def free(self, request: Request) -> None:
        table = self.block_tables.pop(request.request_id, None)
        self._used_slots.pop(request.request_id, None)
        if table:
            self.pool.free(table)

    def get_block_ids(self, request: Request) -> list[int]:
        return self.block_tables[request.request_id]

    def stats(self) -> KVCacheStats:
        free = self.pool.num_free
        return KVCacheStats(total_blocks=self.pool.num_blocks, used_blocks=self.pool.num_blocks - free,
                            free_blocks=free, block_size=self.block_size,
                            used_slots=sum(self._used_slots.values()), active_requests=len(self.block_tables))

    def snapshot(self) -> list[BlockInfo]:
        """Every physical block: who holds it, its reference count, how full it is."""
        owners: dict[int, list[str]] = {}
        fill: dict[int, int] = {}
        bs = self.block_size
        for rid, table in self.block_tables.items():
            used = self._used_slots.get(rid, 0)
            for i, block in enumerate(table):
                owners.setdefault(block, []).append(rid)
                fill.setdefault(block, max(0, min(bs, used - i * bs)))
        refs = self.pool.ref_counts
        return [BlockInfo(b, refs[b], owners.get(b, []), fill.get(b, 0), "used" if refs[b] else "free")
                for b in range(self.pool.num_blocks)]
