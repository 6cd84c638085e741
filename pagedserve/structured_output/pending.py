"""Requests waiting for their grammar: a new schema compiles on the manager's worker thread while the
running batch keeps stepping; the request reaches the scheduler at the first step after its grammar
is ready (vLLM's WAITING_FOR_FSM). A grammar already compiled (the cache) costs no wait at all, and
nothing waits behind a compiling request: ready ones are admitted, in arrival order among them."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from concurrent.futures import FIRST_COMPLETED, Future, wait
from dataclasses import dataclass

from pagedserve.engine.core_messages import EngineCoreOutput

logger = logging.getLogger(__name__)


@dataclass
class _Waiting:
    request_id: str
    grammar: Future
    admit: Callable[[], None]  # hands the request to the scheduler


class PendingGrammars:
    def __init__(self) -> None:
        self._waiting: list[_Waiting] = []

    def __len__(self) -> int:
        return len(self._waiting)

    def add(self, request_id: str, grammar: Future, admit: Callable[[], None]) -> None:
        self._waiting.append(_Waiting(request_id, grammar, admit))

    def release(self) -> list[EngineCoreOutput]:
        """Admit every request whose grammar is ready; an "abort" output for each whose grammar failed
        to compile (it was parsed when its params were made, so this is xgrammar's own failure)."""
        failed = []
        still = []
        for entry in self._waiting:
            if not entry.grammar.done():
                still.append(entry)
            elif entry.grammar.exception() is not None:
                logger.error("request %s: grammar compilation failed: %s", entry.request_id, entry.grammar.exception())
                failed.append(EngineCoreOutput(entry.request_id, [], finish_reason="abort"))
            else:
                entry.admit()
        self._waiting = still
        return failed

    def wait(self, timeout: float) -> None:
        """Block until some waiting grammar is ready (for when the engine has nothing else to do)."""
        if self._waiting:
            wait([w.grammar for w in self._waiting], timeout=timeout, return_when=FIRST_COMPLETED)

    def abort(self, request_ids: Iterable[str]) -> list[str]:
        ids = set(request_ids)
        gone = [w.request_id for w in self._waiting if w.request_id in ids]
        self._waiting = [w for w in self._waiting if w.request_id not in ids]
        return gone
