"""Automatic prefix caching at the block level: hash chains, LRU eviction of cached-free blocks,
hits that take a block back, and copy on write under random fork / append / free sequences."""

from __future__ import annotations

import random

from pagedserve.core.block_pool import BlockPool
from pagedserve.core.kv_cache_manager import KVCacheManager
from pagedserve.core.prefix_cache import extend_block_hashes, hash_block
from pagedserve.core.request import Request
from pagedserve.sampling_params import SamplingParams


def _req(rid: str, tokens: list[int], salt: str | None = None, **params) -> Request:
    return Request(rid, tokens, SamplingParams(**params), cache_salt=salt)


def _compute(kv: KVCacheManager, req: Request, num_new: int | None = None) -> None:
    """What a step does to a request: slots, then (after the forward) its tokens count as computed."""
    num_new = req.num_tokens - req.num_computed_tokens if num_new is None else num_new
    assert kv.allocate_slots(req, num_new)
    req.num_computed_tokens += num_new
    kv.cache_computed_blocks(req)


def _admit(kv: KVCacheManager, req: Request) -> int:
    hits, num_hit = kv.get_computed_blocks(req)
    assert kv.allocate_slots(req, req.num_tokens - num_hit, new_computed_blocks=hits)
    kv.record_prefix_query(req, num_hit)
    req.num_computed_tokens = req.num_tokens
    kv.cache_computed_blocks(req)
    return num_hit


def test_hashes_chain_over_the_whole_prefix_and_take_the_salt():
    a, b = [], []
    extend_block_hashes(a, [1, 2, 3, 4, 5, 6, 7, 8, 9], 4)
    extend_block_hashes(b, [9, 9, 9, 9, 5, 6, 7, 8], 4)
    assert len(a) == 2 and len(b) == 2  # full blocks only
    assert a[1] != b[1]  # same tokens in block 1, different prefixes: different names
    assert a[0] == hash_block(None, [1, 2, 3, 4]) and a[1] == hash_block(a[0], [5, 6, 7, 8])
    salted = []
    extend_block_hashes(salted, [1, 2, 3, 4, 5, 6, 7, 8], 4, cache_salt="tenant-a")
    assert salted[0] != a[0] and salted[1] != a[1]


def test_a_repeated_prompt_hits_every_block_but_the_last_token():
    kv = KVCacheManager(num_blocks=16, block_size=4)
    prompt = list(range(1, 13))  # 3 full blocks
    assert _admit(kv, _req("a", prompt)) == 0
    first = kv.block_tables["a"]
    kv.free(_req("a", prompt))
    assert kv.stats().cached_blocks == 3 and kv.stats().free_blocks == 16
    b = _req("b", prompt)
    assert _admit(kv, b) == 8  # capped: the last token (in block 3) is computed again for its logits
    assert kv.block_tables["b"][:2] == first[:2]
    c = _req("c", prompt + [99])
    assert _admit(kv, c) == 12  # its blocks are held by b: shared, ref count 2
    assert [kv.pool.ref_counts[x] for x in kv.block_tables["c"][:2]] == [2, 2]
    st = kv.stats()
    assert (st.prefix_cache_queries, st.prefix_cache_hits) == (12 + 12 + 13, 8 + 12)


def test_other_salt_and_prompt_logprobs_requests_do_not_hit():
    kv = KVCacheManager(num_blocks=16, block_size=4)
    prompt = list(range(1, 13))
    _admit(kv, _req("a", prompt, salt="x"))
    assert kv.get_computed_blocks(_req("b", prompt, salt="y")) == ([], 0)
    assert kv.get_computed_blocks(_req("c", prompt))[1] == 0
    assert kv.get_computed_blocks(_req("d", prompt, salt="x"))[1] == 8
    assert kv.get_computed_blocks(_req("e", prompt, salt="x", prompt_logprobs=1)) == ([], 0)


def test_caching_off_never_hits():
    kv = KVCacheManager(num_blocks=16, block_size=4, enable_caching=False)
    prompt = list(range(1, 13))
    _admit(kv, _req("a", prompt))
    kv.free(_req("a", prompt))
    assert kv.get_computed_blocks(_req("b", prompt)) == ([], 0) and kv.stats().cached_blocks == 0


def test_eviction_takes_the_least_recently_freed_block_and_tails_first():
    pool = BlockPool(4)
    blocks = pool.allocate(4)
    for i, b in enumerate(blocks):
        pool.cache_block(b, bytes([i]))
    pool.free(blocks[:2][::-1])  # a table's tail first: block 1 then block 0
    pool.free(blocks[2:])
    assert pool.num_cached_free == 4
    (first,) = pool.allocate(1)
    assert first == blocks[1] and pool.lookup(bytes([1])) is None  # evicted: its name is gone
    assert pool.lookup(bytes([0])) == blocks[0]
    pool.touch([blocks[0]])  # a hit takes it out of the free queue
    assert pool.ref_counts[blocks[0]] == 1 and pool.num_free == 2
    assert pool.allocate(2) == blocks[2:]  # block 0 is not handed out while held
    assert pool.num_cached_free == 0


def test_reset_is_refused_while_blocks_are_held():
    kv = KVCacheManager(num_blocks=8, block_size=4)
    a = _req("a", list(range(1, 10)))
    _admit(kv, a)
    assert not kv.reset_prefix_cache()
    kv.free(a)
    assert kv.reset_prefix_cache() and kv.stats().cached_blocks == 0
    assert kv.get_computed_blocks(_req("b", list(range(1, 10)))) == ([], 0)


def test_random_forks_appends_and_frees_never_write_a_shared_block():
    """Property test: whatever the interleaving, every slot a step writes is in a block only the writer
    holds (after its copy on write), reference counts equal the tables holding a block, a copy's
    source holds what the writer's table held, and everything is free at the end."""
    rng = random.Random(0)
    for trial in range(30):
        bs = rng.choice([1, 2, 4])
        kv = KVCacheManager(num_blocks=64, block_size=bs)
        live: list[Request] = []
        contents: dict[int, list[int | None]] = {}  # block -> token per slot (what is "in the cache")
        for step in range(60):
            op = rng.random()
            if op < 0.2 or not live:
                prompt = [rng.randrange(5) for _ in range(rng.randrange(1, 10))]
                r = _req(f"r{trial}-{step}", prompt)
                hits, num_hit = kv.get_computed_blocks(r)
                if not kv.allocate_slots(r, r.num_tokens - num_hit, new_computed_blocks=hits):
                    continue
                for pos in range(num_hit):  # a hit must hold exactly this prompt's tokens
                    assert contents[kv.block_tables[r.request_id][pos // bs]][pos % bs] == r.all_token_ids[pos]
                r.num_computed_tokens = num_hit
                _write(kv, r, contents)
                live.append(r)
            elif op < 0.4:
                parent = rng.choice(live)
                child = _req(f"{parent.request_id}f{step}", parent.prompt_token_ids)
                child.output_token_ids = list(parent.output_token_ids)
                child.num_computed_tokens = kv.fork(parent, child)
                live.append(child)
            elif op < 0.85:
                r = rng.choice(live)
                r.output_token_ids.append(rng.randrange(5))
                if kv.allocate_slots(r, r.num_tokens - r.num_computed_tokens):
                    _write(kv, r, contents)
                else:
                    r.output_token_ids.pop()
            else:
                r = live.pop(rng.randrange(len(live)))
                kv.free(r)
            holders: dict[int, int] = {}
            for table in kv.block_tables.values():
                for b in table:
                    holders[b] = holders.get(b, 0) + 1
            assert all(kv.pool.ref_counts[b] == holders.get(b, 0) for b in range(64))
        for r in live:
            kv.free(r)
        assert kv.stats().free_blocks == 64


def _write(kv: KVCacheManager, r: Request, contents: dict[int, list[int | None]]) -> None:
    """Run the step's copies, check the slots written are private, write them, mark them computed."""
    bs = kv.block_size
    for src, dst in kv.take_pending_copies():
        contents[dst] = list(contents[src])
    table = kv.block_tables[r.request_id]
    for pos in range(r.num_computed_tokens, r.num_tokens):
        block = table[pos // bs]
        assert kv.pool.ref_counts[block] == 1, f"{r.request_id} writes block {block} that others hold"
        contents.setdefault(block, [None] * bs)[pos % bs] = r.all_token_ids[pos]
    for pos in range(r.num_tokens):  # everything the request will read is its own tokens
        assert contents[table[pos // bs]][pos % bs] == r.all_token_ids[pos]
    r.num_computed_tokens = r.num_tokens
    kv.cache_computed_blocks(r)
