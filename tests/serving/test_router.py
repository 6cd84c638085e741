"""`pagedserve router` over real `pagedserve serve` replicas (tiny random-weight models, 127.0.0.1):
each policy routes as specified, streaming passes through chunk by chunk, the API key is enforced,
full replicas give a 503 with Retry-After, tiers and rules pick the replica set."""

from __future__ import annotations

import httpx
import pytest

from tests.server.test_server_support import launch_server, sse_events
from tests.serving.router_support import (
    REPLICA_ARGS,
    HeldRequests,
    backend_args,
    launch_replica,
    launch_replicas,
    launch_router,
    replica_load,
    wait_until,
)

pytestmark = pytest.mark.slow
KEY = "router-key"
LONG_BODY = {"max_tokens": 500, "ignore_eos": True}
# Two sequences run at once and two more may wait at each replica: four held requests fill one.
SMALL = ("--max-num-seqs", "2", "--max-queued-requests", "2")


@pytest.fixture(scope="module")
def replicas(tiny_llama_dir):
    with launch_replicas(str(tiny_llama_dir), 2, *SMALL) as rs:
        yield rs


def _post(router, body: dict, path: str = "/v1/completions", headers: dict | None = None) -> httpx.Response:
    return httpx.post(f"{router.base_url}{path}", json=body, headers={**router.headers, **(headers or {})},
                      timeout=120)


def _routed(router, body: dict, **kw) -> str:
    """Send one request through the router; the replica URL it went to (from the router's decisions)."""
    before = router.decisions()
    r = _post(router, body, **kw)
    assert r.status_code == 200, r.text
    after = router.decisions()
    (url,) = [u for u in after if after[u] != before.get(u, 0.0)]
    return url


def test_round_robin_streaming_models_and_api_key(replicas):
    model = replicas[0].model
    with launch_router(*backend_args(replicas), "--policy", "round_robin", api_key=KEY) as router:
        urls = [_routed(router, {"model": model, "prompt": f"Hello {i}", "max_tokens": 3}) for i in range(4)]
        assert sorted(urls) == sorted([r.base_url for r in replicas] * 2) and urls[0] != urls[1]
        # The API key: refused without it, OpenAI-shaped.
        r = httpx.post(f"{router.base_url}/v1/completions", json={"model": model, "prompt": "x"}, timeout=30)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        # Bad input is refused by the router naming the field, or by the replica (passed through).
        assert _post(router, {"prompt": "x"}).json()["error"]["param"] == "model"
        bad = _post(router, {"model": model, "prompt": "x", "temperature": -1})
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "temperature"
        assert [m["id"] for m in httpx.get(f"{router.base_url}/v1/models", headers=router.headers).json()["data"]] \
            == [model]
        # Streaming: the same greedy text as a replica gives directly, in several SSE events.
        body = {"model": model, "messages": [{"role": "user", "content": "Tell me a story"}], "max_tokens": 12,
                "temperature": 0, "ignore_eos": True}
        direct = replicas[0].post("/v1/chat/completions", json=dict(body)).json()["choices"][0]["message"]["content"]
        client = router.openai()
        extra = {"ignore_eos": body.pop("ignore_eos")}
        chunks = [c.choices[0].delta.content for c in client.chat.completions.create(stream=True, extra_body=extra, **body)
                  if c.choices and c.choices[0].delta.content]
        assert "".join(chunks) == direct  # (events may merge when the reader lags: their count varies)
        with httpx.stream("POST", f"{router.base_url}/v1/completions", headers=router.headers, timeout=60,
                          json={"model": model, "prompt": "Once", "max_tokens": 5, "stream": True}) as r:
            assert r.headers["content-type"].startswith("text/event-stream")
            events = list(sse_events(r.iter_lines()))
        assert events[-1] == "[DONE]" and len(events) >= 3
        # Not buffered: events of a long stream arrive while its replica is still generating it.
        with httpx.stream("POST", f"{router.base_url}/v1/completions", headers=router.headers, timeout=60,
                          json={"model": model, "prompt": "Long", "stream": True, **LONG_BODY}) as r:
            events = sse_events(r.iter_lines())
            for _ in range(3):
                next(events)
            assert sum(replica_load(x) for x in replicas) == 1  # still running: the router relayed early


def test_cache_aware_keeps_each_shared_prefix_on_one_replica(replicas):
    model = replicas[0].model
    systems = [f"System prompt of tenant {t}: " + f"rules for tenant {t} say be kind and brief. " * 4
               for t in range(4)]
    with launch_router(*backend_args(replicas), "--policy", "cache_aware") as router:
        placed: dict[int, set[str]] = {t: set() for t in range(4)}
        for i in range(3):
            for t, system in enumerate(systems):
                placed[t].add(_routed(router, {"model": model, "prompt": system + f"Question {i}?", "max_tokens": 2}))
        assert all(len(urls) == 1 for urls in placed.values()), placed
        assert len({next(iter(u)) for u in placed.values()}) == 2  # new prefixes went to the smaller tree
        # The replicas' own caches agree: every request after a group's first hit its prefix.
        hits = sum(r.metric("vllm:prefix_cache_hits_total") for r in replicas)
        assert hits >= 8 * 40


def test_least_loaded_avoids_the_busy_replica(replicas):
    busy, idle = replicas
    with launch_router(*backend_args(replicas), "--policy", "least_loaded") as router:
        with HeldRequests(busy.base_url, busy.model, 4):
            wait_until(lambda: replica_load(busy) == 4, what="busy replica loaded")
            router.wait_for(lambda: router.backend(busy.base_url)["num_waiting"] >= 2, what="load scraped")
            urls = [_routed(router, {"model": busy.model, "prompt": f"Hi {i}", "max_tokens": 2}) for i in range(4)]
        assert urls == [idle.base_url] * 4


def test_kv_aware_follows_the_replicas_real_cached_blocks(replicas):
    model = replicas[0].model
    with launch_router(*backend_args(replicas), "--policy", "kv_aware") as router:
        for target in (replicas[1], replicas[0], replicas[1]):
            # Computed on one replica directly, so only its KV events can tell the router where it is.
            doc = f"Document {target.base_url[-5:]} {len(router.decisions())}: " + "the quick brown fox jumps. " * 8
            assert target.post("/v1/completions", json={"model": model, "prompt": doc, "max_tokens": 1}).status_code == 200
            seq = httpx.get(f"{target.base_url}/kv_events", params={"since": "-1"}, timeout=10).json()["last_seq"]
            router.wait_for(lambda t=target, s=seq: router.backend(t.base_url)["kv_last_seq"] >= s,
                            what="the replica's events read")
            before = router.decisions()
            r = _post(router, {"model": model, "prompt": doc + " Summarize it.", "max_tokens": 2})
            assert r.status_code == 200
            after = router.decisions()
            assert [u for u in after if after[u] != before.get(u, 0.0)] == [target.base_url]
            assert r.json()["usage"]["prompt_tokens_details"]["cached_tokens"] >= 40
        # A chat request is tokenized with the replica's template: its repeat finds the first's blocks.
        chat = {"model": model, "messages": [{"role": "user", "content": "A long question " * 20}], "max_tokens": 1}
        first = _routed(router, chat, path="/v1/chat/completions")
        router.wait_for(lambda: router.backend(first)["kv_blocks"] > 0, what="kv events read")
        assert _routed(router, chat, path="/v1/chat/completions") == first


def test_session_sticks_to_one_replica(replicas):
    model = replicas[0].model
    with launch_router(*backend_args(replicas), "--policy", "session") as router:
        seen = {}
        for s in range(8):
            urls = {_routed(router, {"model": model, "prompt": "hi", "max_tokens": 1},
                            headers={"X-Session-Id": f"s{s}"}) for _ in range(3)}
            assert len(urls) == 1
            seen[s] = urls.pop()
        assert len(set(seen.values())) == 2
        user = {_routed(router, {"model": model, "prompt": "hi", "max_tokens": 1, "user": "alice"}) for _ in range(3)}
        assert len(user) == 1


def test_503_when_every_replica_is_full_and_when_the_queue_is(replicas):
    model = replicas[0].model
    with launch_router(*backend_args(replicas), "--policy", "least_loaded") as router:
        with HeldRequests(replicas[0].base_url, model, 4), HeldRequests(replicas[1].base_url, model, 4):
            for _ in range(10):  # a held request that just ended frees a seat for a moment: try again then
                wait_until(lambda: all(replica_load(r) == 4 for r in replicas), what="replicas full")
                r = _post(router, {"model": model, "prompt": "one more", "max_tokens": 2})
                if r.status_code == 503:
                    break
            assert r.status_code == 503 and r.headers["retry-after"]
            assert r.json()["error"]["type"] == "service_unavailable"
            assert router.metric("pagedserve_router_retries_total", tier="default", reason="backend_503") >= 1
        wait_until(lambda: all(replica_load(r) == 0 for r in replicas), what="replicas idle")
    # The router's own bound: one request per replica, nothing queued.
    with launch_router(*backend_args(replicas), "--max-in-flight-per-replica", "1", "--max-queued-requests", "0") as router:
        held = [httpx.Client(timeout=60) for _ in range(2)]
        streams = [c.stream("POST", f"{router.base_url}/v1/completions",
                            json={"model": model, "prompt": "long", "stream": True, **LONG_BODY}) for c in held]
        try:
            for s in streams:
                assert s.__enter__().status_code == 200
            r = _post(router, {"model": model, "prompt": "third", "max_tokens": 2})
            assert r.status_code == 503 and r.headers["retry-after"] and "queued" in r.json()["error"]["message"]
        finally:
            for c in held:
                c.close()





def test_tiers_by_model_header_and_prompt_length(replicas, tiny_llama_dir, tmp_path):
    small = replicas[0].model
    with launch_server(str(tiny_llama_dir), *REPLICA_ARGS, "--served-model-name", "tiny-large", api_key=None) as large:
        tiers = tmp_path / "tiers.yaml"
        tiers.write_text(
            f"tiers:\n  - {{name: small, model: '{small}', replicas: ['{replicas[0].base_url}', '{replicas[1].base_url}']}}\n"
            f"  - {{name: large, model: tiny-large, replicas: ['{large.base_url}'], policy: least_loaded}}\n"
            "rules:\n  - {tier: large, header: X-Tier, value: large}\n  - {tier: large, min_prompt_chars: 200}\n"
            "  - {tier: small, max_prompt_chars: 199}\n")
        with launch_router("--config", str(tiers), "--policy", "round_robin") as router:
            assert sorted(m["id"] for m in httpx.get(f"{router.base_url}/v1/models").json()["data"]) == \
                sorted([small, "tiny-large"])
            assert _routed(router, {"model": "tiny-large", "prompt": "hi", "max_tokens": 1}) == large.base_url
            assert _routed(router, {"model": small, "prompt": "x" * 500, "max_tokens": 1}) != large.base_url
            r = _post(router, {"model": "auto", "prompt": "long " * 60, "max_tokens": 1})
            assert r.status_code == 200 and r.json()["model"] == "tiny-large"
            assert _routed(router, {"model": "auto", "prompt": "hi", "max_tokens": 1},
                           headers={"X-Tier": "large"}) == large.base_url
            assert _routed(router, {"model": "auto", "prompt": "hi", "max_tokens": 1}) != large.base_url


def _aborts(replicas) -> float:
    return sum(r.metric("vllm:request_success_total", finished_reason="abort") for r in replicas)


def test_a_client_that_leaves_aborts_its_replica_request_embeddings_pass(replicas):
    model = replicas[0].model
    with launch_router(*backend_args(replicas)) as router:
        before = _aborts(replicas)
        with pytest.raises(httpx.ReadTimeout):  # a non-streamed request whose client gives up
            httpx.post(f"{router.base_url}/v1/completions", json={"model": model, "prompt": "leave", **LONG_BODY},
                       timeout=0.5)
        wait_until(lambda: _aborts(replicas) - before == 1, timeout=20, what="the replica aborting it")
        with httpx.stream("POST", f"{router.base_url}/v1/completions", timeout=60,
                          json={"model": model, "prompt": "leave later", "stream": True, **LONG_BODY}) as r:
            events = sse_events(r.iter_lines())
            next(events), next(events)  # then hang up mid-stream
        wait_until(lambda: _aborts(replicas) - before == 2, timeout=20, what="the replica aborting the stream")
        router.wait_for(lambda: all(b["in_flight"] == 0 for b in router.backends()), what="slots released")
        r = _post(router, {"model": model, "input": "embed me"}, path="/v1/embeddings")
        assert r.status_code == 200 and len(r.json()["data"][0]["embedding"]) == 64
    # The per-request deadline: a 504 before the first byte, and the replica stops working on it.
    with launch_router(*backend_args(replicas), "--request-timeout", "0.5") as router:
        before = _aborts(replicas)
        r = _post(router, {"model": model, "prompt": "too slow", **LONG_BODY})
        assert r.status_code == 504 and r.json()["error"]["code"] == "deadline_exceeded"
        wait_until(lambda: _aborts(replicas) - before == 1, timeout=20, what="the replica aborting it")
    r = httpx.get(f"{replicas[0].base_url}/kv_events", params={"limit": "0"}, timeout=10)
    assert r.status_code == 400 and r.json()["error"]["param"] == "limit"


def test_replicas_with_their_own_key_kv_events_need_it(tiny_llama_dir):
    model = str(tiny_llama_dir)
    with launch_replica(model, "--api-key", "replica-key") as rep:
        r = httpx.get(f"{rep.base_url}/kv_events", timeout=10)
        assert r.status_code == 401  # block hashes reveal which prompts were sent
        with launch_router("--backend", rep.base_url, "--backend-api-key", "replica-key", "--policy", "kv_aware") as router:
            body = {"model": model, "prompt": "A shared document. " * 12, "max_tokens": 1}
            assert _post(router, body).status_code == 200
            router.wait_for(lambda: router.backend(rep.base_url)["kv_synced"], what="kv events read with the key")
            r = _post(router, {**body, "prompt": body["prompt"] + "More."})
            assert r.status_code == 200 and r.json()["usage"]["prompt_tokens_details"]["cached_tokens"] > 0
            assert router.metric("pagedserve_router_routing_decisions_total", tier="default", policy="kv_aware",
                                 backend=rep.base_url, reason="kv_hit") >= 1
