"""Per-request block tables on top of the block pool, and the cache's memory statistics."""

from __future__ import annotations

from dataclasses import dataclass

from pagedserve.core.block_pool import BlockPool


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


class KVCacheManager:
    def __init__(self, num_blocks: int, block_size: int) -> None:
        self.block_size = block_size
        self.pool = BlockPool(num_blocks)
        self.block_tables: dict[str, list[int]] = {}
        self._used_slots: dict[str, int] = {}

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def allocate_slots(self, request_id: str, num_tokens: int, reserve_tokens: int = 0) -> bool:
        """Make the request's table cover `num_tokens` slots (at least `reserve_tokens` blocks' worth).

        All or nothing: returns False and changes nothing when the pool is short.
        """
        table = self.block_tables.get(request_id, [])
        need = self.blocks_needed(max(num_tokens, reserve_tokens)) - len(table)
        if need > self.pool.num_free:
            return False
        if need > 0:
            table = table + self.pool.allocate(need)
        self.block_tables[request_id] = table
        self._used_slots[request_id] = num_tokens
        return True

    def free(self, request_id: str) -> None:
        table = self.block_tables.pop(request_id, None)
        self._used_slots.pop(request_id, None)
        if table:
            self.pool.free(table)

    def get_block_table(self, request_id: str) -> list[int]:
        return self.block_tables[request_id]

    def stats(self) -> KVCacheStats:
        free = self.pool.num_free
        return KVCacheStats(total_blocks=self.pool.num_blocks, used_blocks=self.pool.num_blocks - free,
                            free_blocks=free, block_size=self.block_size,
                            used_slots=sum(self._used_slots.values()), active_requests=len(self.block_tables))
