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
