"""Replaying a workload's arrivals against wall-clock time, for the in-process runners.

Open loop: a request is due once its arrival offset has passed. Closed loop (concurrency C): a
request is due whenever fewer than C are in flight, and its arrival is the moment it was released.
The runner steps its system between calls; only when the system is idle and the next arrival lies in
the future does it wait (that wait is the workload's think time, not a stand-in for compute).
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable

from pagedserve.bench.workloads import Workload, WorkloadRequest


class ArrivalReplay:
    def __init__(self, workload: Workload, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.concurrency = workload.concurrency
        order = workload.requests if self.concurrency else sorted(workload.requests, key=lambda r: r.arrival_offset)
        self._pending: deque[WorkloadRequest] = deque(order)
        self.t0 = clock()

    def start(self) -> float:
        self.t0 = self.clock()
        return self.t0

    def now(self) -> float:
        """Seconds since start."""
        return self.clock() - self.t0

    @property
    def exhausted(self) -> bool:
        return not self._pending

    def due(self, in_flight: int) -> list[tuple[WorkloadRequest, float]]:
        """Requests to hand to the system now, each with its arrival time (s since start)."""
        out = []
        if self.concurrency:
            while self._pending and in_flight + len(out) < self.concurrency:
                out.append((self._pending.popleft(), self.now()))
            return out
        now = self.now()
        while self._pending and self._pending[0].arrival_offset <= now:
            r = self._pending.popleft()
            out.append((r, r.arrival_offset))
        return out

    def wait_for_next(self) -> None:
        """Idle until the next open-loop arrival (no-op in a closed loop or when nothing is pending)."""
        if self._pending and not self.concurrency:
            delay = self._pending[0].arrival_offset - self.now()
            if delay > 0:
                time.sleep(delay)
