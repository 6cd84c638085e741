import pytest

from pagedserve.core.block_pool import BlockPool, OutOfBlocksError
from pagedserve.core.kv_cache_manager import KVCacheManager
from pagedserve.core.request import Request
from pagedserve.sampling_params import SamplingParams


def _req(rid: str) -> Request:
    return Request(rid, [1], SamplingParams())


def test_pool_allocate_free_and_refcounts():
    pool = BlockPool(4)
    a = pool.allocate(3)
    assert pool.num_free == 1 and all(pool.ref_counts[b] == 1 for b in a)
    pool.incref(a[:1])
    pool.free(a)
    assert pool.num_free == 3  # the shared block still has an owner
    pool.free(a[:1])
    assert pool.num_free == 4
    with pytest.raises(OutOfBlocksError):
        pool.allocate(5)
    with pytest.raises(AssertionError):
        pool.free([0])


def test_manager_all_or_nothing_and_stats():
    kv = KVCacheManager(num_blocks=4, block_size=4)
    a, b = _req("a"), _req("b")
    assert kv.allocate_slots(a, 5)  # 2 blocks
    assert kv.allocate_slots(b, 8)  # 2 blocks
    assert not kv.allocate_slots(a, 9)  # needs a third block: none free, nothing changes
    assert len(kv.get_block_ids(a)) == 2
    st = kv.stats()
    assert (st.used_blocks, st.free_blocks, st.active_requests) == (4, 0, 2)
    assert st.utilization == 1.0
    assert st.fragmentation == pytest.approx((16 - 13) / 16)
    kv.free(a)
    kv.free(b)
    assert kv.stats().free_blocks == 4


def test_reservation_counts_as_fragmentation():
    kv = KVCacheManager(num_blocks=8, block_size=4)
    kv.allocate_slots(_req("s"), 2, num_lookahead_tokens=14)  # static policy: reserve prompt + max_tokens
    st = kv.stats()
    assert st.used_blocks == 4 and st.fragmentation == pytest.approx(14 / 16)


def test_fork_shares_every_block_and_copies_the_partial_one_on_write():
    kv = KVCacheManager(num_blocks=8, block_size=4)
    parent, child = _req("p"), _req("c")
    assert kv.allocate_slots(parent, 10)  # 3 blocks: two full, one with 2 of 4 slots used
    parent.num_computed_tokens = 10
    assert kv.fork(parent, child) == 10  # the child need not compute any of the 10 tokens
    child.num_computed_tokens = 10
    shared = kv.get_block_ids(child)
    assert shared == kv.get_block_ids(parent) and all(kv.pool.ref_counts[b] == 2 for b in shared)
    assert kv.allocate_slots(child, 1)  # writes slot 10, in the shared partial block: its own copy first
    assert kv.take_pending_copies() == [(shared[2], kv.get_block_ids(child)[2])]
    assert kv.get_block_ids(child)[:2] == shared[:2] and kv.get_block_ids(child)[2] != shared[2]
    assert kv.pool.ref_counts[shared[2]] == 1
    assert kv.allocate_slots(parent, 1)  # now the parent's alone: written in place, no copy
    assert kv.take_pending_copies() == [] and kv.get_block_ids(parent) == shared
    kv.free(parent)
    assert all(kv.pool.ref_counts[b] == 1 for b in shared[:2]) and kv.stats().used_blocks == 3
    kv.free(child)
    assert kv.stats().free_blocks == 8


def test_snapshot_lists_every_block_with_owners_refs_and_fill():
    kv = KVCacheManager(num_blocks=4, block_size=4, enable_caching=False)
    a, b = _req("a"), _req("b")
    kv.allocate_slots(a, 6)
    a.num_computed_tokens = 6
    kv.fork(a, b)
    snap = kv.snapshot()
    assert [s.block_id for s in snap] == [0, 1, 2, 3]
    table = kv.get_block_ids(a)
    first, second = snap[table[0]], snap[table[1]]
    assert (first.owners, first.ref_count, first.num_tokens, first.state) == (["a", "b"], 2, 4, "used")
    assert (second.owners, second.ref_count, second.num_tokens) == (["a", "b"], 2, 2)
    assert sum(s.state == "free" for s in snap) == 2 and kv.get_computed_blocks(a) == ([], 0)
