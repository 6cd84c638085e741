"""The waiting queue and the scheduling policy it carries (vLLM's --scheduling-policy).

The policy decides three things, and only here: which waiting request is admitted next, which
running request is preempted when blocks run out, and whether a waiting request may preempt a
running one to take its seat or blocks.

- fcfs: arrival order; the victim is the most recently admitted; preempted requests wait at the
  front (they were admitted before anyone still waiting); a waiting request never preempts.
- priority: (priority, arrival time, arrival counter) order, lower first; the victim is the worst
  running request by that order; preempted requests go back at their place in it; a waiting request
  with a strictly better (lower) priority than the worst running one may preempt it.
"""

from __future__ import annotations

import bisect
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Iterator

from pagedserve.core.request import Request


def rank(req: Request) -> tuple[int, float, int]:
    """Lower is served first: priority, then arrival time, then the order the scheduler got them."""
    return req.priority, req.arrival_time, req.queue_order


class WaitingQueue(ABC):
    """Requests waiting for admission (new ones and preempted ones), in the order they are admitted:
    `_q`, a deque or a list that the subclass's add and requeue keep in that order."""

    _q: deque[Request] | list[Request]

    @abstractmethod
    def add(self, req: Request) -> None:
        """A request that has not run yet (a new one, or an n > 1 sibling that cannot fork)."""

    @abstractmethod
    def requeue(self, req: Request) -> None:
        """A preempted request, to be recomputed."""

    @abstractmethod
    def pop(self) -> Request:
        """Remove and return `peek()`."""

    @abstractmethod
    def victim_index(self, running: list[Request]) -> int:
        """Index in `running` (not empty) of the request to preempt when blocks run out."""

    @abstractmethod
    def may_preempt(self, waiting: Request, running: Request) -> bool:
        """Whether `waiting`, unable to get a seat or blocks, may preempt `running` (the victim) for them."""

    def peek(self) -> Request:
        """The next request to admit (the queue is not empty)."""
        return self._q[0]

    def remove(self, req: Request) -> None:
        self._q.remove(req)

    def __iter__(self) -> Iterator[Request]:
        return iter(self._q)

    def __len__(self) -> int:
        return len(self._q)

    def __bool__(self) -> bool:
        return len(self._q) > 0

    def __contains__(self, req: object) -> bool:
        return req in self._q

    def __getitem__(self, index: int) -> Request:
        """The index-th request in admission order (`queue[0]` is `peek()`)."""
        return self._q[index]


class FCFSQueue(WaitingQueue):
    def __init__(self) -> None:
        self._q: deque[Request] = deque()

    def add(self, req: Request) -> None:
        self._q.append(req)

    def requeue(self, req: Request) -> None:
        self._q.appendleft(req)

    def pop(self) -> Request:
        return self._q.popleft()

    def victim_index(self, running: list[Request]) -> int:
        return len(running) - 1  # the most recently admitted

    def may_preempt(self, waiting: Request, running: Request) -> bool:
        return False


class PriorityQueue(WaitingQueue):
    """Kept sorted by `rank` (a list: insertion is a bisect and a memmove, fine at thousands)."""

    def __init__(self) -> None:
        self._q: list[Request] = []

    def add(self, req: Request) -> None:
        bisect.insort_right(self._q, req, key=rank)  # equal ranks (beams of one search) keep their order

    def requeue(self, req: Request) -> None:
        self.add(req)  # its rank is unchanged: it waits at its place, ahead of later equals

    def pop(self) -> Request:
        return self._q.pop(0)

    def victim_index(self, running: list[Request]) -> int:
        # The worst rank; among equals (beams of one search) the most recently admitted, as fcfs.
        return max(reversed(range(len(running))), key=lambda i: rank(running[i]))

    def may_preempt(self, waiting: Request, running: Request) -> bool:
        # Strictly better priority only: equals never preempt each other (no thrashing among them).
        return waiting.priority < running.priority


def make_waiting_queue(scheduling_policy: str) -> WaitingQueue:
    queues: dict[str, type[WaitingQueue]] = {"fcfs": FCFSQueue, "priority": PriorityQueue}
    return queues[scheduling_policy]()
