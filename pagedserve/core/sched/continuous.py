"""Continuous (iteration-level) batching: every step serves running requests first (their next
token, or the rest of a chunked prefill), then admits waiting ones into the leftover token budget
and free blocks, starting each after the longest prefix the cache already holds; when blocks run out
the newest running request is preempted (freed, recomputed: its own blocks are cache hits then)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from pagedserve.core.sched.output import ScheduledRequest, SchedulerOutput

if TYPE_CHECKING:
    from pagedserve.core.sched.scheduler import Scheduler


def schedule_continuous(s: Scheduler) -> SchedulerOutput:
    out = SchedulerOutput()
    kv, config = s.kv, s.config
    budget = config.max_num_batched_tokens
    i = 0
    while i < len(s.running) and budget > 0:
        req = s.running[i]
        num_new = min(req.num_tokens_with_spec - req.num_computed_tokens, budget)
        while not kv.allocate_slots(req, num_new, s.num_lookahead_tokens):
            victim = s.running.pop()  # the most recently admitted
            s.preempt(victim)
            out.preempted.append(victim)
            if victim is req:
                break
        else:
            num_spec = max(0, req.num_computed_tokens + num_new - req.num_tokens)
            out.scheduled.append(ScheduledRequest(req, num_new, kv.get_block_ids(req), num_spec))
            budget -= num_new
            i += 1
            continue
        break  # req itself was preempted: nothing after it is left to serve

    # Admit waiting requests only if nobody had to be preempted this step (else they would thrash).
    while (not out.preempted and s.waiting and budget > 0 and len(s.running) < config.max_num_seqs):
        req = s.waiting[0]
        hits, num_hit = kv.get_computed_blocks(req)  # a prefix already in the cache is not computed again
        remaining = req.num_tokens - num_hit
        if remaining > budget and not config.enable_chunked_prefill:
            break
        num_new = min(remaining, budget)
        if not kv.allocate_slots(req, num_new, s.num_lookahead_tokens, new_computed_blocks=hits):
            break
        kv.record_prefix_query(req, num_hit)
        req.num_computed_tokens = num_hit
        if req.num_cached_tokens is None:
            req.num_cached_tokens = num_hit
        s.waiting.popleft()
        s.start_running(req)
        out.scheduled.append(ScheduledRequest(req, num_new, kv.get_block_ids(req)))
        budget -= num_new
    return out
