"""Iteration-level scheduling: which requests run in the next step and with how many tokens.

Two policies share everything else (model, kernels, sampler):
- continuous: every step serves running requests first (one decode token, or the rest of a chunked
  prefill), then admits waiting ones into the leftover token budget and free blocks; when blocks
  run out the newest running request is preempted (blocks freed, recomputed later).
- static: a batch is admitted only when nothing runs, with KV for prompt + max_tokens reserved up
  front; nobody joins until the whole batch has finished.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

from pagedserve.config import SchedulerConfig
from pagedserve.core.kv_cache_manager import KVCacheManager
from pagedserve.request import Request, RequestStatus


@dataclass
class ScheduledRequest:
    request: Request
    num_new_tokens: int
    block_table: list[int]

    @property
    def completes_prompt(self) -> bool:
        """After this step every known token is in the cache, so the next token can be sampled."""
        return self.request.num_computed_tokens + self.num_new_tokens == self.request.num_tokens


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledRequest] = field(default_factory=list)
    preempted: list[Request] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.scheduled)

    @property
    def empty(self) -> bool:
        return not self.scheduled


class Scheduler:
    def __init__(self, config: SchedulerConfig, kv: KVCacheManager) -> None:
        self.config = config
        self.kv = kv
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.num_preemptions = 0

    def add_request(self, request: Request) -> None:
        self.waiting.append(request)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> SchedulerOutput:
        if self.config.policy == "static":
            return self._schedule_static()
        return self._schedule_continuous()

    # --- continuous ------------------------------------------------------------------------------

    def _schedule_continuous(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.config.max_num_batched_tokens
        i = 0
        while i < len(self.running) and budget > 0:
            req = self.running[i]
            num_new = min(req.num_tokens - req.num_computed_tokens, budget)
            while not self.kv.allocate_slots(req.request_id, req.num_computed_tokens + num_new):
                victim = self.running.pop()  # the most recently admitted
                self._preempt(victim)
                out.preempted.append(victim)
                if victim is req:
                    break
            else:
                out.scheduled.append(ScheduledRequest(req, num_new, self.kv.get_block_table(req.request_id)))
                budget -= num_new
                i += 1
                continue
            break  # req itself was preempted: nothing after it is left to serve

        # Admit waiting requests only if nobody had to be preempted this step (else they would thrash).
        while (not out.preempted and self.waiting and budget > 0
               and len(self.running) < self.config.max_num_seqs):
            req = self.waiting[0]
            remaining = req.num_tokens - req.num_computed_tokens
            if remaining > budget and not self.config.enable_chunked_prefill:
                break
            num_new = min(remaining, budget)
            if not self.kv.allocate_slots(req.request_id, num_new):
                break
            self.waiting.popleft()
            self._start_running(req)
            out.scheduled.append(ScheduledRequest(req, num_new, self.kv.get_block_table(req.request_id)))
            budget -= num_new
        return out

    def _preempt(self, req: Request) -> None:
        self.kv.free(req.request_id)
        req.status = RequestStatus.PREEMPTED
        req.num_computed_tokens = 0  # recompute prompt + generated tokens when readmitted
        self.num_preemptions += 1
        self.waiting.appendleft(req)

    def _start_running(self, req: Request) -> None:
        req.status = RequestStatus.RUNNING
        if req.metrics.first_scheduled_time is None:
            req.metrics.first_scheduled_time = time.monotonic()
        self.running.append(req)

    # --- static ----------------------------------------------------------------------------------

    def _schedule_static(self) -> SchedulerOutput:
        if not self.running:
            while self.waiting and len(self.running) < self.config.max_num_seqs:
                req = self.waiting[0]
                # Reserve the whole prompt + max_tokens now: a static batch never preempts.
                if not self.kv.allocate_slots(req.request_id, 0, reserve_tokens=req.max_total_tokens):
                    break
                self.waiting.popleft()
                self._start_running(req)
        out = SchedulerOutput()
        budget = self.config.max_num_batched_tokens
        for req in self.running:
            if budget <= 0:
                break
            num_new = min(req.num_tokens - req.num_computed_tokens, budget)
            self.kv.allocate_slots(req.request_id, req.num_computed_tokens + num_new,
                                   reserve_tokens=req.max_total_tokens)
            out.scheduled.append(ScheduledRequest(req, num_new, self.kv.get_block_table(req.request_id)))
            budget -= num_new
        return out

    # --- after the step --------------------------------------------------------------------------

    def finish_request(self, req: Request, status: RequestStatus) -> None:
        """Finished or aborted: leave the queues and give the blocks back at once."""
        req.status = status
        if req in self.running:
            self.running.remove(req)
        elif req in self.waiting:
            self.waiting.remove(req)
        self.kv.free(req.request_id)
