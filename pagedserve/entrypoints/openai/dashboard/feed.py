"""One snapshot loop shared by every open page.

While at least one page listens, a task takes a snapshot from the engine every `interval_s` (on the
engine's thread, between two steps: `EngineClient.live_snapshot`), encodes it once as an SSE event
and hands it to each listener. A listener that falls behind keeps only the newest event (its queue
holds one), so a slow browser costs the engine nothing more; with no listener the loop stops.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator

from pagedserve.engine.protocol import EngineClient

logger = logging.getLogger(__name__)


def sse(event: str, data: str) -> bytes:
    return f"event: {event}\ndata: {data}\n\n".encode()


class DashboardFeed:
    def __init__(self, engine: EngineClient, interval_s: float, max_cells: int, max_rows: int) -> None:
        self.engine = engine
        self.interval_s = interval_s
        self.max_cells = max_cells
        self.max_rows = max_rows
        self._listeners: set[asyncio.Queue[bytes]] = set()
        self._task: asyncio.Task[None] | None = None
        self.snapshots = 0  # taken since the start (tests and the overhead benchmark read it)
        self.last_size = 0  # bytes of the latest event

    @property
    def listeners(self) -> int:
        return len(self._listeners)

    async def listen(self) -> AsyncIterator[bytes]:
        queue: asyncio.Queue[bytes] = asyncio.Queue(maxsize=1)
        self._listeners.add(queue)
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._run())
        try:
            while True:
                yield await queue.get()
        finally:
            self._listeners.discard(queue)

    async def _run(self) -> None:
        while self._listeners:
            try:
                snap = await self.engine.live_snapshot(self.max_cells, self.max_rows)
            except Exception as e:  # the engine is gone: say so, and let the pages retry
                event = sse("unavailable", f"engine unavailable: {e}")
            else:
                if snap is None:
                    event = sse("unavailable", "this engine has no live view")
                else:
                    event = sse("snapshot", json.dumps(snap, separators=(",", ":")))
                    self.snapshots += 1
            self.last_size = len(event)
            for queue in list(self._listeners):
                if queue.full():  # a slow reader: drop its stale event, keep the newest
                    with contextlib.suppress(asyncio.QueueEmpty):
                        queue.get_nowait()
                queue.put_nowait(event)
            await asyncio.sleep(self.interval_s)  # the page's refresh rate
