"""Scheduler policies on bare requests (no model): budgets, chunking, preemption, static admission."""

from pagedserve.config import SchedulerConfig
from pagedserve.core.kv_cache_manager import KVCacheManager
from pagedserve.core.request import Request, RequestStatus
from pagedserve.core.sched.scheduler import Scheduler
from pagedserve.sampling_params import SamplingParams


def _req(i: int, prompt_len: int, max_tokens: int = 8) -> Request:
    return Request(f"r{i}", list(range(prompt_len)), SamplingParams(max_tokens=max_tokens), None)


def _advance(sched, out, token=1):
    """What the engine does after a forward: count computed tokens, append a token when due."""
    for s in out.scheduled:
        done = s.completes_prompt
        s.request.num_computed_tokens += s.num_new_tokens
        if done:
            s.request.output_token_ids.append(token)


def test_chunked_prefill_respects_token_budget():
    kv = KVCacheManager(64, 4)
    sched = Scheduler(SchedulerConfig(max_num_batched_tokens=10), kv)
    sched.add_request(_req(0, 25))
    sizes = []
    for _ in range(3):
        out = sched.schedule()
        sizes.append(out.num_tokens)
        _advance(sched, out)
    assert sizes == [10, 10, 5]
    assert sched.running[0].output_token_ids == [1]  # sampled only once the prompt was complete


def test_running_first_then_waiting_and_seq_cap():
    kv = KVCacheManager(64, 4)
    sched = Scheduler(SchedulerConfig(max_num_seqs=2, max_num_batched_tokens=100), kv)
    for i in range(3):
        sched.add_request(_req(i, 5))
    out = sched.schedule()
    assert [s.request.request_id for s in out.scheduled] == ["r0", "r1"]
    _advance(sched, out)
    sched.finish_request(sched.running[0], RequestStatus.FINISHED_STOPPED)
    out = sched.schedule()  # r1 decodes first, then r2 joins at once in the freed seat
    assert [(s.request.request_id, s.num_new_tokens) for s in out.scheduled] == [("r1", 1), ("r2", 5)]


def test_preempts_newest_when_blocks_run_out_and_frees_everything():
    kv = KVCacheManager(4, 4)  # 16 slots
    sched = Scheduler(SchedulerConfig(max_num_batched_tokens=100), kv)
    a, b = _req(0, 8), _req(1, 8)
    sched.add_request(a)
    sched.add_request(b)
    out = sched.schedule()
    assert len(out.scheduled) == 2 and kv.stats().free_blocks == 0
    _advance(sched, out)
    out = sched.schedule()  # a needs a 3rd block: b (newest) is preempted
    assert out.preempted == [b] and [s.request for s in out.scheduled] == [a]
    assert b.status == RequestStatus.PREEMPTED and b.num_computed_tokens == 0 and sched.waiting[0] is b
    sched.finish_request(a, RequestStatus.FINISHED_STOPPED)
    sched.finish_request(b, RequestStatus.FINISHED_ABORTED)
    assert kv.stats().free_blocks == 4


def test_static_admits_only_when_idle_and_reserves_everything():
    kv = KVCacheManager(64, 4)
    sched = Scheduler(SchedulerConfig(policy="static", max_num_seqs=2), kv)
    reqs = [_req(i, 4, max_tokens=12) for i in range(3)]
    for r in reqs:
        sched.add_request(r)
    out = sched.schedule()
    assert [s.request for s in out.scheduled] == reqs[:2]
    assert kv.stats().used_blocks == 2 * 4  # (4 + 12) / 4 blocks each, reserved up front
    _advance(sched, out)
    sched.finish_request(reqs[0], RequestStatus.FINISHED_STOPPED)
    out = sched.schedule()  # a seat is free, but the batch is not over: r2 must wait
    assert [s.request for s in out.scheduled] == [reqs[1]]
    sched.finish_request(reqs[1], RequestStatus.FINISHED_STOPPED)
    out = sched.schedule()
    assert [s.request for s in out.scheduled] == [reqs[2]]


# --- scheduling_policy="priority" (vLLM's --scheduling-policy priority) ----------------------------


def _preq(name: str, prompt_len: int, priority: int, arrival: float, max_tokens: int = 8) -> Request:
    return Request(name, list(range(prompt_len)), SamplingParams(max_tokens=max_tokens), None, arrival,
                   priority=priority)


def _ids(reqs) -> list[str]:
    return [getattr(r, "request", r).request_id for r in reqs]


def test_priority_admission_order_is_priority_then_arrival_then_order():
    kv = KVCacheManager(64, 4)
    sched = Scheduler(SchedulerConfig(scheduling_policy="priority", max_num_seqs=1), kv)
    for r in [_preq("late-low", 4, 0, 3.0), _preq("high", 4, 5, 1.0), _preq("early-low", 4, 0, 2.0),
              _preq("tie-a", 4, 1, 1.5), _preq("tie-b", 4, 1, 1.5), _preq("neg", 4, -2, 9.0)]:
        sched.add_request(r)
    assert _ids(sched.waiting) == ["neg", "early-low", "late-low", "tie-a", "tie-b", "high"]
    order = []
    while sched.has_unfinished():
        out = sched.schedule()
        order += _ids(out.scheduled)
        for s in out.scheduled:  # one seat: each runs alone, then leaves
            sched.finish_request(s.request, RequestStatus.FINISHED_STOPPED)
    assert order == ["neg", "early-low", "late-low", "tie-a", "tie-b", "high"]
    assert kv.stats().free_blocks == 64


def test_fcfs_ignores_priority():
    kv = KVCacheManager(64, 4)
    sched = Scheduler(SchedulerConfig(max_num_seqs=1), kv)
    for r in [_preq("a", 4, 5, 1.0), _preq("b", 4, 0, 2.0), _preq("c", 4, -1, 3.0)]:
        sched.add_request(r)
    assert _ids(sched.waiting) == ["a", "b", "c"]
    assert _ids(sched.schedule().scheduled) == ["a"]


def _running_pair(policy: str):
    """4 blocks of 4 slots. `low` (priority 5) is admitted first, `high` (priority 0) a step later; after
    two steps the pool is full, and the next step `high` needs a third block."""
    kv = KVCacheManager(4, 4)
    sched = Scheduler(SchedulerConfig(scheduling_policy=policy, max_num_batched_tokens=100), kv)
    low, high = _preq("low", 4, 5, 1.0), _preq("high", 8, 0, 2.0)
    sched.add_request(low)
    _advance(sched, sched.schedule())
    sched.add_request(high)
    out = sched.schedule()
    assert _ids(out.scheduled) == ["low", "high"] and kv.stats().free_blocks == 0
    _advance(sched, out)
    return kv, sched, low, high


def test_priority_preempts_the_worst_running_even_if_served_earlier_in_the_step():
    kv, sched, low, high = _running_pair("priority")
    out = sched.schedule()  # low is served first (admitted first), then high needs a block: low goes
    assert out.preempted == [low] and _ids(out.scheduled) == ["high"]
    assert out.num_tokens == 1 and low.status == RequestStatus.PREEMPTED and low.num_computed_tokens == 0
    assert kv.block_tables.keys() == {"high"} and sched.running == [high]
    sched.finish_request(high, RequestStatus.FINISHED_STOPPED)
    out = sched.schedule()  # low comes back, recomputed (its prompt and its output token)
    assert _ids(out.scheduled) == ["low"] and out.scheduled[0].num_new_tokens == low.num_tokens
    sched.finish_request(low, RequestStatus.FINISHED_STOPPED)
    assert kv.stats().free_blocks == 4


def test_fcfs_preempts_the_newest_in_the_same_situation():
    kv, sched, low, high = _running_pair("fcfs")
    out = sched.schedule()
    assert out.preempted == [high] and _ids(out.scheduled) == ["low"]
    assert sched.waiting[0] is high


def test_priority_preempted_request_waits_at_its_priority_position():
    kv, sched, low, high = _running_pair("priority")
    sched.add_request(_preq("worse", 4, 9, 0.5))
    sched.add_request(_preq("better", 4, 1, 5.0))
    sched.add_request(_preq("equal-later", 4, 5, 3.0))
    sched.schedule()
    assert _ids(sched.waiting) == ["better", "low", "equal-later", "worse"]


def test_priority_arrival_preempts_worst_running_for_blocks():
    kv = KVCacheManager(4, 4)
    sched = Scheduler(SchedulerConfig(scheduling_policy="priority", max_num_batched_tokens=100), kv)
    low = _preq("low", 8, 5, 1.0)
    sched.add_request(low)
    _advance(sched, sched.schedule())  # 2 blocks; the next token needs a 3rd
    urgent = _preq("urgent", 7, 0, 2.0)  # needs 2 blocks; after low's step 1 is left
    sched.add_request(urgent)
    out = sched.schedule()
    assert out.preempted == [low] and _ids(out.scheduled) == ["urgent"] and out.num_tokens == 7
    assert sched.running == [urgent] and _ids(sched.waiting) == ["low"]
    assert kv.block_tables.keys() == {"urgent"}
    out = sched.schedule()  # low was preempted in the step before: it may wait for blocks now
    assert _ids(out.scheduled) == ["urgent"]  # low (needs 3 blocks) does not fit beside it: no thrash
    sched.abort_requests(["urgent", "low"])
    assert kv.stats().free_blocks == 4 and not sched.has_unfinished()


def test_priority_equal_or_worse_arrival_never_preempts():
    kv = KVCacheManager(4, 4)
    sched = Scheduler(SchedulerConfig(scheduling_policy="priority", max_num_batched_tokens=100), kv)
    low = _preq("low", 8, 5, 1.0)
    sched.add_request(low)
    _advance(sched, sched.schedule())
    sched.add_request(_preq("equal", 7, 5, 2.0))
    sched.add_request(_preq("worse", 7, 6, 0.0))
    out = sched.schedule()
    assert not out.preempted and _ids(out.scheduled) == ["low"]
    assert _ids(sched.waiting) == ["equal", "worse"]


def test_priority_arrival_preempts_worst_running_for_a_seat():
    kv = KVCacheManager(64, 4)
    sched = Scheduler(SchedulerConfig(scheduling_policy="priority", max_num_seqs=2), kv)
    a, b = _preq("a", 4, 3, 1.0), _preq("b", 4, 7, 2.0)
    sched.add_request(a)
    sched.add_request(b)
    _advance(sched, sched.schedule())
    sched.add_request(_preq("same-as-b", 4, 7, 0.5))  # not strictly better than b: waits
    assert not sched.schedule().preempted
    sched.add_request(_preq("vip", 4, 0, 3.0))
    out = sched.schedule()
    assert out.preempted == [b] and _ids(out.scheduled) == ["a", "vip"]
    assert [r.request_id for r in sched.running] == ["a", "vip"]
    assert _ids(sched.waiting) == ["same-as-b", "b"]  # equal priority: the earlier arrival first


def test_fcfs_never_preempts_for_a_waiting_request():
    kv = KVCacheManager(64, 4)
    sched = Scheduler(SchedulerConfig(max_num_seqs=1), kv)
    sched.add_request(_preq("a", 4, 0, 1.0))
    _advance(sched, sched.schedule())
    sched.add_request(_preq("b", 4, -5, 2.0))
    out = sched.schedule()
    assert not out.preempted and _ids(out.scheduled) == ["a"]


def test_priority_under_pressure_frees_every_block():
    """Many requests of mixed priorities through a small pool, a few aborted midway: the scheduler's
    invariants hold every step and the pool is full again at the end."""
    import random

    from pagedserve.worker.runner_output import ModelRunnerOutput

    rng = random.Random(0)  # a seed whose run takes every preemption path
    kv = KVCacheManager(12, 4)
    sched = Scheduler(SchedulerConfig(scheduling_policy="priority", max_num_seqs=4, max_num_batched_tokens=16),
                      kv)
    pending = [_preq(f"r{i}", rng.randint(3, 12), rng.randint(0, 4), float(i), max_tokens=rng.randint(1, 24))
               for i in range(40)]
    steps = preempted = 0
    while pending or sched.has_unfinished():
        for _ in range(rng.randint(0, 3)):
            if pending:
                sched.add_request(pending.pop(0))
        out = sched.schedule()
        scheduled = [s.request for s in out.scheduled]
        assert len(set(map(id, scheduled))) == len(scheduled)
        assert all(r in sched.running for r in scheduled)
        assert not set(map(id, scheduled)) & set(map(id, out.preempted))
        assert all(r not in sched.waiting for r in sched.running)
        assert sorted(r.request_id for r in sched.running) == sorted(kv.block_tables)
        preempted += len(out.preempted)
        due = [s.request.request_id for s in out.scheduled if s.completes_prompt]
        sched.update_from_output(out, ModelRunnerOutput(due, [[7] for _ in due]))
        if steps % 9 == 4 and sched.running:
            sched.abort_requests([rng.choice(sched.running).request_id])
        steps += 1
        assert steps < 2000
    assert preempted > 0
    assert kv.stats().free_blocks == kv.stats().total_blocks and not kv.block_tables


def test_priority_needs_the_continuous_policy():
    import pytest

    with pytest.raises(ValueError, match="scheduling_policy must be 'fcfs' with policy 'static'"):
        SchedulerConfig(policy="static", scheduling_policy="priority")
    with pytest.raises(ValueError, match=r"scheduling_policy must be one of \('fcfs', 'priority'\), got 'lifo'"):
        SchedulerConfig(scheduling_policy="lifo")
