"""Balancing policies on stand-in replicas (no processes): what each one chooses and why; the radix
tree; the tiers file's checks."""

from __future__ import annotations

import pytest

from pagedserve.serving.backends import Backend, parse_metrics
from pagedserve.serving.config import (
    CacheAwareConfig,
    ConfigError,
    KVAwareConfig,
    RouterConfig,
    TierConfig,
    load_tiers,
)
from pagedserve.serving.kv_index import prompt_block_hashes
from pagedserve.serving.policies import (
    CacheAware,
    KVAware,
    LeastLoaded,
    RoundRobin,
    RouteRequest,
    Session,
    prompt_text,
)
from pagedserve.serving.radix_tree import RadixTree


def _backends(n: int) -> list[Backend]:
    return [Backend(f"http://127.0.0.1:{9000 + i}", "t", healthy=True) for i in range(n)]


def _req(text: str = "", body: dict | None = None, headers: dict | None = None) -> RouteRequest:
    return RouteRequest("/v1/completions", body or {"prompt": text}, headers or {}, text)


def test_radix_tree_matches_prefixes_and_evicts_least_recent():
    t = RadixTree(max_chars=40)
    t.insert("system prompt A: question one")
    t.insert("system prompt A: question two")
    assert t.match("system prompt A: question three") == len("system prompt A: question t")
    assert t.match("other") == 0
    t.insert("system prompt B")  # over 40 chars: the least recently used leaf goes first
    assert t.num_chars <= 40
    assert t.match("system prompt B") == len("system prompt B")


def test_round_robin_cycles():
    bs = _backends(3)
    p = RoundRobin()
    assert [p.choose(bs, _req())[0] for _ in range(6)] == bs + bs


def test_least_loaded_counts_in_flight_and_the_replicas_queue():
    a, b = _backends(2)
    a.in_flight, b.num_waiting = 1, 3  # b's queue holds other clients' requests
    p = LeastLoaded()
    assert all(p.choose([a, b], _req())[0] is a for _ in range(4))
    a.in_flight = 0
    b.num_waiting = 0
    b.kv_usage = 0.5  # equal load: the emptier KV cache wins
    assert p.choose([a, b], _req())[0] is a


def test_session_sticks_and_moves_only_the_lost_replicas_keys():
    bs = _backends(3)
    p = Session("x-session-id")
    keys = [f"user-{i}" for i in range(60)]
    first = {k: p.choose(bs, _req(headers={"x-session-id": k}))[0] for k in keys}
    assert len(set(first.values())) == 3  # spread over all
    assert all(p.choose(bs, _req(headers={"x-session-id": k}))[0] is first[k] for k in keys)
    assert p.choose(bs, _req(body={"user": "user-7"}))[0] is first["user-7"]  # the body's user works too
    left = [b for b in bs if b is not bs[0]]
    for k in keys:
        if first[k] is not bs[0]:
            assert p.choose(left, _req(headers={"x-session-id": k}))[0] is first[k]


def test_cache_aware_follows_matches_then_the_smallest_tree_then_load():
    a, b = _backends(2)
    p = CacheAware(CacheAwareConfig(cache_threshold=0.5, balance_abs_threshold=4, balance_rel_threshold=1.5))
    system = "You are a helpful assistant for tenant number seven. " * 3
    first, why = p.choose([a, b], _req(system + "q1"))
    p.on_routed(first, _req(system + "q1"))
    assert why == "smallest_tree"
    for i in range(5):  # shared prefix: same replica
        r = _req(system + f"question {i}")
        chosen, why = p.choose([a, b], r)
        p.on_routed(chosen, r)
        assert chosen is first and why == "prefix_match"
    other, why = p.choose([a, b], _req("completely different text"))
    assert other is not first and why == "smallest_tree"
    first.in_flight, other.in_flight = 10, 1  # imbalance above both thresholds: least loaded wins
    assert p.choose([a, b], _req(system + "again")) == (other, "imbalanced")


def test_kv_aware_scores_saved_tokens_against_queued_ones():
    a, b = _backends(2)
    tokens = list(range(1, 42))
    for x in (a, b):
        x.kv.block_size, x.kv.synced = 4, True
    b.kv.hashes = set(prompt_block_hashes(tokens[:24], 4, None))  # b holds 6 blocks of the prompt
    p = KVAware(KVAwareConfig(queue_penalty=1.0))
    r = _req(body={"prompt": tokens})
    r.token_ids = tokens
    assert p.choose([a, b], r) == (b, "kv_hit")
    b.queued_tokens = 30  # 24 saved, 30 queued: a is better
    assert p.choose([a, b], r)[0] is a
    salted = _req(body={"prompt": tokens, "cache_salt": "other-tenant"})
    salted.token_ids = tokens
    b.queued_tokens = 0
    assert p.saved_tokens(b, salted) == 0  # another tenant's salt: none of its blocks


def test_prompt_text_of_chat_and_completions():
    assert prompt_text("/v1/completions", {"prompt": ["first", "second"]}) == "first"
    chat = {"messages": [{"role": "system", "content": "S"}, {"role": "user", "content": [{"type": "text", "text": "U"}]}]}
    assert prompt_text("/v1/chat/completions", chat) == "system:S\nuser:U\n"


def test_parse_metrics_sums_labelled_samples():
    text = ('# TYPE vllm:num_requests_waiting gauge\nvllm:num_requests_waiting{model_name="m"} 3.0\n'
            '# TYPE vllm:kv_cache_usage_perc gauge\nvllm:kv_cache_usage_perc{model_name="m"} 0.25\n')
    assert parse_metrics(text) == {"vllm:num_requests_waiting": 3.0, "vllm:kv_cache_usage_perc": 0.25}


def test_tiers_file_and_its_errors(tmp_path):
    good = tmp_path / "tiers.yaml"
    good.write_text("tiers:\n  - {name: small, model: s, replicas: ['http://127.0.0.1:1/']}\n"
                    "  - {name: large, model: l, replicas: ['http://127.0.0.1:2'], policy: cache_aware}\n"
                    "rules:\n  - {tier: large, min_prompt_chars: 100}\n  - {tier: small}\n")
    tiers, rules = load_tiers(good)
    assert [t.replicas for t in tiers] == [["http://127.0.0.1:1"], ["http://127.0.0.1:2"]]
    assert rules[0].matches({}, 150) and not rules[0].matches({}, 50) and rules[1].matches({}, 0)
    cases = {"tiers: []\n": "tiers",
             "tiers:\n  - {name: a, replicas: ['http://x']}\n": "tiers[0].model",
             "tiers:\n  - {name: a, model: m, replicas: ['ftp://x']}\n": "tiers[0].replicas",
             "tiers:\n  - {name: a, model: m, replicas: ['http://x'], colour: red}\n": "colour",
             "tiers:\n  - {name: a, model: m, replicas: ['http://x']}\nrules:\n  - {tier: a, min_prompt_chars: -1}\n":
                 "rules[0].min_prompt_chars"}
    for text, field in cases.items():
        bad = tmp_path / "bad.yaml"
        bad.write_text(text)
        with pytest.raises(ConfigError, match=field.replace("[", r"\[").replace("]", r"\]")):
            load_tiers(bad)
    with pytest.raises(ConfigError, match="policy"):
        RouterConfig([TierConfig("a", "m", ["http://x"])], policy="fastest").validate()
