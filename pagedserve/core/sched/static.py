"""Static batching, the honest baseline: a batch is admitted only when nothing runs, with KV for
prompt + max_tokens reserved up front; nobody joins until the whole batch has finished."""

from __future__ import annotations

from typing import TYPE_CHECKING

from pagedserve.core.sched.output import ScheduledRequest, SchedulerOutput

if TYPE_CHECKING:
    from pagedserve.core.sched.scheduler import Scheduler


def schedule_static(s: Scheduler) -> SchedulerOutput:
    kv, config = s.kv, s.config
    if not s.running:
        while s.waiting and len(s.running) < config.max_num_seqs:
            req = s.waiting.peek()
            # Reserve the whole prompt + max_tokens now: a static batch never preempts.
            if not kv.allocate_slots(req, 0, num_lookahead_tokens=req.max_total_tokens):
                break
            s.waiting.pop()
            s.start_running(req)
    out = SchedulerOutput()
    budget = config.max_num_batched_tokens
    for req in s.running:
        if budget <= 0:
            break
        num_new = min(req.num_tokens - req.num_computed_tokens, budget)
        reserved = max(0, req.max_total_tokens - req.num_computed_tokens - num_new)
        kv.allocate_slots(req, num_new, num_lookahead_tokens=reserved)
        out.scheduled.append(ScheduledRequest(req, num_new, kv.get_block_ids(req)))
        budget -= num_new
    return out
