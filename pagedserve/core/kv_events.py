"""KV cache events: which prefix-cache block hashes the engine holds, as a sequence of changes.

vLLM publishes `BlockStored` / `BlockRemoved` / `AllBlocksCleared` events so that a router can
route on each replica's actual cache instead of guessing it from prompt text. The block pool calls
this log (its optional event sink) when it names a block (`cache_block`), forgets one (eviction) or
forgets all (`reset_prefix_cache`). The log is written on the engine thread and read by the server's
event loop, so it takes a lock; it is bounded (old events are dropped) and also keeps the current set
of hashes, so a reader that fell behind, or a new one, can start again from a snapshot.
"""

from __future__ import annotations

import os
import threading
from collections import deque
from dataclasses import dataclass

STORED, REMOVED, CLEARED = "stored", "removed", "cleared"


@dataclass(frozen=True)
class KVEvent:
    seq: int  # 1, 2, ... in the order the pool changed
    type: str  # STORED | REMOVED | CLEARED
    block_hash: bytes | None  # None for CLEARED


@dataclass
class KVEventBatch:
    """What a reader gets: the events after its sequence number, or a snapshot when it cannot have them."""

    epoch: str  # changes when the engine restarts: a reader's sequence numbers mean nothing across epochs
    last_seq: int  # the newest event's number (the reader's next `since`)
    events: list[KVEvent]
    snapshot: list[bytes] | None  # every hash held now, when the reader must start again from it
    more: bool  # events remain after these (the batch was capped)


class KVEventLog:
    def __init__(self, max_events: int = 65536) -> None:
        self.epoch = os.urandom(8).hex()
        self._events: deque[KVEvent] = deque(maxlen=max_events)
        self._held: set[bytes] = set()
        self._seq = 0
        self._lock = threading.Lock()

    # --- the block pool's side (engine thread) ---------------------------------------------------

    def stored(self, block_hash: bytes) -> None:
        with self._lock:
            self._held.add(block_hash)
            self._append(STORED, block_hash)

    def removed(self, block_hash: bytes) -> None:
        with self._lock:
            self._held.discard(block_hash)
            self._append(REMOVED, block_hash)

    def cleared(self) -> None:
        with self._lock:
            self._held.clear()
            self._append(CLEARED, None)

    def _append(self, type: str, block_hash: bytes | None) -> None:
        self._seq += 1
        self._events.append(KVEvent(self._seq, type, block_hash))

    # --- readers (any thread) -----------------------------------------------------------------------

    def read(self, since: int, epoch: str | None = None, limit: int = 4096) -> KVEventBatch:
        """Events with seq > `since`, at most `limit`. A reader from another epoch, one that asks for
        since < 0, or one whose next event was dropped already gets a snapshot of the held hashes instead."""
        with self._lock:
            oldest = self._events[0].seq if self._events else self._seq + 1
            if epoch not in (None, self.epoch) or since < 0 or since > self._seq or since + 1 < oldest:
                return KVEventBatch(self.epoch, self._seq, [], sorted(self._held), False)
            start = since + 1 - oldest  # events are numbered without gaps
            events = [self._events[i] for i in range(start, min(len(self._events), start + limit))]
            last = events[-1].seq if events else self._seq
            return KVEventBatch(self.epoch, last, events, None, last < self._seq)

    @property
    def num_held(self) -> int:
        with self._lock:
            return len(self._held)
