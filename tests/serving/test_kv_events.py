"""KV events: the block pool reports what its prefix cache names and forgets; the log serves readers
events after a sequence number, or a snapshot when they cannot have them; the router's index, fed by
the log, holds exactly the pool's cached hashes and computes a prompt's hashes the engine's way."""

from __future__ import annotations

from pagedserve.core.kv_cache_manager import KVCacheManager
from pagedserve.core.kv_events import CLEARED, REMOVED, STORED, KVEventLog
from pagedserve.core.request import Request
from pagedserve.sampling_params import SamplingParams
from pagedserve.serving.kv_index import KVIndex, prompt_block_hashes


def _run(kv: KVCacheManager, rid: str, tokens: list[int], salt: str | None = None) -> Request:
    """Admit, compute and finish a request as the scheduler does (cache hits first)."""
    req = Request(rid, tokens, SamplingParams(max_tokens=1), cache_salt=salt)
    hits, num_hit = kv.get_computed_blocks(req)
    assert kv.allocate_slots(req, req.num_tokens - num_hit, new_computed_blocks=hits)
    req.num_computed_tokens = req.num_tokens
    kv.cache_computed_blocks(req)
    kv.free(req)
    return req


def _as_json(batch) -> dict:
    """What GET /kv_events sends (entrypoints/openai/kv_events.py's shape)."""
    return {"epoch": batch.epoch, "block_size": 4, "last_seq": batch.last_seq, "more": batch.more,
            "events": [{"seq": e.seq, "type": e.type, "block_hash": e.block_hash.hex() if e.block_hash else None}
                       for e in batch.events],
            "snapshot": None if batch.snapshot is None else [h.hex() for h in batch.snapshot]}


def _cached(kv: KVCacheManager) -> set[bytes]:
    return {h for h in kv.pool.block_hashes if h is not None}


def test_pool_reports_stored_evicted_and_cleared_blocks():
    log = KVEventLog()
    kv = KVCacheManager(num_blocks=4, block_size=4, kv_events=log)
    _run(kv, "a", list(range(9)))  # two full blocks named
    batch = log.read(0)
    assert [e.type for e in batch.events] == [STORED, STORED]
    assert {e.block_hash for e in batch.events} == _cached(kv)
    _run(kv, "b", list(range(100, 113)))  # three more blocks: the pool of 4 evicts the first prompt's
    types = [e.type for e in log.read(batch.last_seq).events]
    assert types.count(REMOVED) >= 1 and types.count(STORED) == 3
    assert kv.reset_prefix_cache()
    assert log.read(log.read(0).last_seq - 1).events[-1].type == CLEARED
    assert log.num_held == 0


def test_index_follows_the_pool_through_events_and_snapshots():
    log = KVEventLog(max_events=3)  # tiny: readers fall behind and must take a snapshot
    kv = KVCacheManager(num_blocks=6, block_size=4, kv_events=log)
    index = KVIndex()
    index.apply(_as_json(log.read(-1)))  # a new reader starts from a snapshot
    assert index.synced and index.hashes == set()
    for i in range(5):
        _run(kv, f"r{i}", [i] * 10 + list(range(7)))
        batch = log.read(index.last_seq, index.epoch)
        if i >= 1:  # 4 events since the last read: more than the log keeps
            assert batch.snapshot is not None
        index.apply(_as_json(batch))
        assert index.hashes == _cached(kv)
    other = KVEventLog()  # a restarted engine: another epoch, so the reader's numbers mean nothing there
    assert other.read(index.last_seq, index.epoch).snapshot == []


def test_router_hashes_are_the_engines():
    kv = KVCacheManager(num_blocks=16, block_size=4, kv_events=KVEventLog())
    tokens = list(range(50, 63))
    req = _run(kv, "x", tokens, salt="tenant-a")
    assert prompt_block_hashes(tokens, 4, "tenant-a") == req.block_hashes[:3]
    assert prompt_block_hashes(tokens, 4, None)[0] != req.block_hashes[0]  # the salt keeps tenants apart
    index = KVIndex()
    index.apply(_as_json(kv.kv_events.read(-1)))
    assert index.cached_tokens(prompt_block_hashes(tokens + [1, 2, 3, 4], 4, "tenant-a")) == 12
    assert index.cached_tokens(prompt_block_hashes([7] + tokens, 4, "tenant-a")) == 0


def test_bounded_batches_say_more():
    log = KVEventLog()
    for i in range(10):
        log.stored(bytes([i]) * 32)
    batch = log.read(0, limit=4)
    assert [e.seq for e in batch.events] == [1, 2, 3, 4] and batch.more and batch.last_seq == 4
    rest = log.read(4, batch.epoch, limit=100)
    assert [e.seq for e in rest.events] == list(range(5, 11)) and not rest.more
