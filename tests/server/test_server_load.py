"""Under load: client disconnects abort requests and free their KV blocks; the admission bound gives 503s;
/metrics parses and its counters and gauges follow what the engine does."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from tests.server.test_server_support import launch_server

LONG = {"max_tokens": 400, "temperature": 1.0, "ignore_eos": True}  # seconds of work unless aborted


@pytest.fixture(scope="module")
def server(tiny_llama_dir):
    with launch_server(str(tiny_llama_dir), "--num-blocks", "512", "--num-threads", "1", "--max-num-seqs", "8",
                       "--max-queued-requests", "64") as s:
        yield s


@pytest.fixture(scope="module")
def small_server(tiny_llama_dir):
    """Two sequences run at once and two more may wait: a fifth concurrent request gets 503."""
    with launch_server(str(tiny_llama_dir), "--num-blocks", "512", "--num-threads", "1", "--max-num-seqs", "2",
                       "--max-queued-requests", "2") as s:
        yield s


def _aborts(server) -> float:
    return server.metric("vllm:request_success_total", finished_reason="abort")


def _first_event(lines) -> str:
    for line in lines:
        if line.startswith("data: "):
            return line
    raise AssertionError("the stream ended without an event")


def _assert_idle(m: dict) -> None:
    assert m[("vllm:num_requests_running", ())] == 0
    assert m[("vllm:num_requests_waiting", ())] == 0
    assert m[("vllm:kv_cache_usage_perc", ())] == 0
    assert m[("pagedserve:kv_blocks_free", ())] == m[("pagedserve:kv_blocks_total", ())] > 0


async def _read_then_hang_up(server, i: int, chunks: int = 2) -> int:
    """Stream a long request, read `chunks` events, then close the connection mid-way."""
    chat = i % 2 == 1
    path = "/v1/chat/completions" if chat else "/v1/completions"
    body = ({"messages": [{"role": "user", "content": f"story {i}"}]} if chat else {"prompt": f"Story {i}:"})
    async with httpx.AsyncClient(base_url=server.base_url, headers=server.headers, timeout=60) as client:
        async with client.stream("POST", path, json={**body, **LONG, "stream": True}) as r:
            assert r.status_code == 200
            seen = 0
            async for line in r.aiter_lines():
                if line.startswith("data: "):
                    seen += 1
                    if seen == chunks:
                        break  # leaving the block closes the unread response: the connection drops
    return seen


def test_50_streams_closed_midway_free_all_blocks(server):
    before = _aborts(server)

    async def run() -> list[int]:
        return await asyncio.gather(*(_read_then_hang_up(server, i) for i in range(50)))

    assert asyncio.run(run()) == [2] * 50
    m = server.wait_idle()
    _assert_idle(m)
    # every one of them was aborted, not finished: nothing kept generating for a closed connection
    assert _aborts(server) - before == 50
    r = server.post("/v1/completions", json={"prompt": "still there?", "max_tokens": 3})
    assert r.status_code == 200


def test_non_streaming_disconnect_aborts(server):
    before = _aborts(server)
    with pytest.raises(httpx.ReadTimeout), httpx.Client(base_url=server.base_url, headers=server.headers,
                                                        timeout=httpx.Timeout(60, read=0.5)) as c:
        c.post("/v1/completions", json={"prompt": "A very long answer:", **LONG})
    _assert_idle(server.wait_idle())
    assert _aborts(server) - before == 1


def test_metrics_parse_and_move(server):
    server.wait_idle()
    before = server.metrics()
    names = {name for name, _ in before}
    for name in ("vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc",
                 "vllm:prompt_tokens_total", "vllm:generation_tokens_total", "vllm:num_preemptions_total",
                 "vllm:time_to_first_token_seconds_count", "vllm:inter_token_latency_seconds_bucket",
                 "vllm:e2e_request_latency_seconds_sum", "vllm:request_queue_time_seconds_count"):
        assert name in names, name
    text = httpx.get(f"{server.base_url}/metrics").text
    assert f'model_name="{server.model}"' in text

    r = server.post("/v1/completions", json={"prompt": "Count with me: one two", "max_tokens": 7,
                                             "temperature": 0, "ignore_eos": True}).json()
    after = server.wait_idle()

    def delta(name: str, **labels: str) -> float:
        key = (name, tuple(sorted(labels.items())))
        return after.get(key, 0.0) - before.get(key, 0.0)

    assert delta("vllm:prompt_tokens_total") == r["usage"]["prompt_tokens"]
    assert delta("vllm:generation_tokens_total") == 7
    assert delta("vllm:request_success_total", finished_reason="length") == 1
    assert delta("vllm:time_to_first_token_seconds_count") == 1
    assert delta("vllm:e2e_request_latency_seconds_count") == 1
    assert delta("vllm:request_queue_time_seconds_count") == 1
    assert delta("vllm:inter_token_latency_seconds_count") == 6
    assert delta("vllm:e2e_request_latency_seconds_sum") > 0


def test_gauges_while_running(server):
    with httpx.Client(base_url=server.base_url, headers=server.headers, timeout=60) as c, \
            c.stream("POST", "/v1/completions", json={"prompt": "Go on:", **LONG, "stream": True}) as r:
        lines = r.iter_lines()  # held: dropping the iterator would close the response (a disconnect)
        _first_event(lines)
        m = server.metrics()
        assert m[("vllm:num_requests_running", ())] == 1
        assert 0 < m[("vllm:kv_cache_usage_perc", ())] <= 1
        assert m[("pagedserve:kv_blocks_free", ())] < m[("pagedserve:kv_blocks_total", ())]
    _assert_idle(server.wait_idle())


def test_overload_gives_503_and_accepted_requests_complete(small_server):
    async def one(client: httpx.AsyncClient, i: int) -> httpx.Response:
        return await client.post("/v1/completions", json={"prompt": f"Request {i}:", "max_tokens": 200,
                                                          "temperature": 1.0, "seed": i, "ignore_eos": True})

    async def flood() -> list[httpx.Response]:
        limits = httpx.Limits(max_connections=30)
        async with httpx.AsyncClient(base_url=small_server.base_url, headers=small_server.headers, timeout=120,
                                     limits=limits) as client:
            return await asyncio.gather(*(one(client, i) for i in range(30)))

    responses = asyncio.run(flood())
    ok = [r for r in responses if r.status_code == 200]
    rejected = [r for r in responses if r.status_code == 503]
    assert len(ok) + len(rejected) == 30
    assert len(ok) >= 4 and rejected  # 2 running + 2 queued were admitted before any could finish
    for r in rejected:
        assert r.headers["Retry-After"].isdigit()
        err = r.json()["error"]
        assert err["code"] == "server_overloaded" and err["type"] == "service_unavailable" and err["message"]
    for r in ok:
        choice = r.json()["choices"][0]
        assert choice["finish_reason"] == "length" and r.json()["usage"]["completion_tokens"] == 200
    _assert_idle(small_server.wait_idle())
    assert small_server.post("/v1/completions", json={"prompt": "after", "max_tokens": 2}).status_code == 200


def test_disconnect_while_queued_aborts(small_server):
    """Both running slots busy: a third request waits in the queue; its client gives up; it is dropped."""
    before = _aborts(small_server)
    with httpx.Client(base_url=small_server.base_url, headers=small_server.headers, timeout=60) as c:
        with c.stream("POST", "/v1/completions", json={"prompt": "one", **LONG, "stream": True}) as r1, \
                c.stream("POST", "/v1/completions", json={"prompt": "two", **LONG, "stream": True}) as r2:
            streams = [r.iter_lines() for r in (r1, r2)]  # held open: dropping them would hang up
            for lines in streams:
                _first_event(lines)
            with pytest.raises(httpx.ReadTimeout), httpx.Client(base_url=small_server.base_url,
                                                                headers=small_server.headers,
                                                                timeout=httpx.Timeout(60, read=0.5)) as c3:
                c3.post("/v1/completions", json={"prompt": "three", **LONG})
            m = small_server.metrics()
            assert m[("vllm:num_requests_running", ())] == 2
    _assert_idle(small_server.wait_idle())
    assert _aborts(small_server) - before == 3
