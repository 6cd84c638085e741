"""One replica's prefix cache as the router knows it: the set of block hashes it holds, kept in step
with the replica's GET /kv_events (entrypoints/openai/kv_events.py), and how many of a prompt's
leading blocks it holds.

The hashes are the engine's own (`core/prefix_cache.py`: chained over `block_size` token ids, the
first block salted by `cache_salt`), so the router computes a prompt's hashes from its token ids with
the same function and looks them up here.
"""

from __future__ import annotations

import httpx

from pagedserve.core.kv_events import CLEARED, REMOVED, STORED
from pagedserve.core.prefix_cache import extend_block_hashes


class KVIndex:
    def __init__(self) -> None:
        self.hashes: set[bytes] = set()
        self.block_size: int | None = None
        self.epoch: str | None = None
        self.last_seq = -1  # -1: ask for a snapshot
        self.synced = False

    async def poll(self, client: httpx.AsyncClient, url: str, timeout: float) -> bool:
        """Read the events since the last poll; True when more are waiting."""
        params = {"since": str(self.last_seq)}
        if self.epoch is not None:
            params["epoch"] = self.epoch
        r = await client.get(f"{url}/kv_events", params=params, timeout=timeout)
        r.raise_for_status()
        self.apply(r.json())
        return bool(r.json().get("more"))

    def apply(self, batch: dict) -> None:
        if batch.get("snapshot") is not None:  # new reader, fell behind, or the replica restarted
            self.hashes = {bytes.fromhex(h) for h in batch["snapshot"]}
        for e in batch["events"]:
            if e["type"] == STORED:
                self.hashes.add(bytes.fromhex(e["block_hash"]))
            elif e["type"] == REMOVED:
                self.hashes.discard(bytes.fromhex(e["block_hash"]))
            elif e["type"] == CLEARED:
                self.hashes.clear()
        self.epoch = batch["epoch"]
        self.block_size = batch["block_size"]
        self.last_seq = batch["last_seq"]
        self.synced = True

    def cached_tokens(self, hashes: list[bytes]) -> int:
        """Leading tokens of a prompt whose block hashes are `hashes` that this replica holds."""
        assert self.block_size is not None
        n = 0
        for h in hashes:
            if h not in self.hashes:
                break
            n += 1
        return n * self.block_size


def prompt_block_hashes(token_ids: list[int], block_size: int, cache_salt: str | None) -> list[bytes]:
    """The engine's hashes of a prompt's full blocks (the same function the engine names blocks with)."""
    hashes: list[bytes] = []
    extend_block_hashes(hashes, token_ids, block_size, cache_salt)
    return hashes
