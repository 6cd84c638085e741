"""Continuous (iteration-level) batching: every step serves running requests first (their next
token, or the rest of a chunked prefill), then admits waiting ones into the leftover token budget
and free blocks, starting each after the longest prefix the cache already holds; when blocks run out
a running request is preempted (freed, recomputed: its own blocks are cache hits then). Which one,
and the admission order, is the waiting queue's policy (request_queue.py): under fcfs the newest
running request; under priority the worst-ranked, and a better-priority waiting request may also
preempt the worst running one for its seat or blocks."""

from __future__ import annotations

from typing import TYPE_CHECKING

from pagedserve.core.request import Request
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
            v = s.waiting.victim_index(s.running)  # fcfs: the last (the most recently admitted)
            victim = s.running.pop(v)
            if v < i:  # priority: it may have been served earlier in this step
                i -= 1
            budget += _preempt(s, out, victim)
            if victim is req:
                break
        else:
            num_spec = max(0, req.num_computed_tokens + num_new - req.num_tokens)
            out.scheduled.append(ScheduledRequest(req, num_new, kv.get_block_ids(req), num_spec))
            budget -= num_new
            i += 1
        # If req itself was preempted, the requests after it (fcfs: none are left) are still served.

    # Admit waiting requests only if nobody had to be preempted this step (else they would thrash).
    if out.preempted:
        return out
    while s.waiting and budget > 0:
        req = s.waiting.peek()
        if req in out.preempted:
            break  # preempted this step to make room: it does not come straight back
        if len(s.running) >= config.max_num_seqs:
            freed = _preempt_for(s, out, req)
            if freed is None:
                break
            budget += freed
            continue
        hits, num_hit = kv.get_computed_blocks(req)  # a prefix already in the cache is not computed again
        remaining = req.num_tokens - num_hit
        if remaining > budget and not config.enable_chunked_prefill:
            break
        num_new = min(remaining, budget)
        if not kv.allocate_slots(req, num_new, s.num_lookahead_tokens, new_computed_blocks=hits):
            freed = _preempt_for(s, out, req)
            if freed is None:
                break
            budget += freed
            continue  # look the prefix up again: the victim's freed blocks may hold some of it
        kv.record_prefix_query(req, num_hit)
        req.num_computed_tokens = num_hit
        if req.num_cached_tokens is None:
            req.num_cached_tokens = num_hit
        s.waiting.pop()
        s.start_running(req)
        out.scheduled.append(ScheduledRequest(req, num_new, kv.get_block_ids(req)))
        budget -= num_new
    return out


def _preempt_for(s: Scheduler, out: SchedulerOutput, req: Request) -> int | None:
    """The waiting `req` lacks a seat or blocks: preempt the worst running request if the policy lets
    `req` outrank it (never under fcfs). Returns the token budget given back, or None if nothing was."""
    if not s.running:
        return None
    v = s.waiting.victim_index(s.running)
    if not s.waiting.may_preempt(req, s.running[v]):
        return None
    return _preempt(s, out, s.running.pop(v))


def _preempt(s: Scheduler, out: SchedulerOutput, victim: Request) -> int:
    """Preempt `victim` (already out of `s.running`); if it was served earlier in this step, take it
    out of the step again. Returns the token budget that gives back."""
    freed = 0
    for j, sr in enumerate(out.scheduled):
        if sr.request is victim:
            freed = sr.num_new_tokens
            del out.scheduled[j]
            break
    s.preempt(victim)
    out.preempted.append(victim)
    return freed
