"""The live page over HTTP: the API key guards the page, its stream and its details (header or
?api_key=, since a browser's EventSource sends no headers); the stream's snapshots describe the
running engine; block and request details answer, unknown ones are 404s."""

from __future__ import annotations

import json
import threading

import httpx
import pytest

from tests.server.test_server_support import API_KEY, launch_server


@pytest.fixture(scope="module")
def server(tiny_llama_dir):
    with launch_server(str(tiny_llama_dir), "--num-blocks", "64", "--block-size", "4", "--max-num-seqs", "4",
                       "--dashboard-interval", "0.1") as s:
        yield s


def _snapshots(server, count: int, query: str = f"?api_key={API_KEY}"):
    """The first `count` snapshots of the stream."""
    out = []
    with httpx.stream("GET", f"{server.base_url}/dashboard/stream{query}", timeout=30) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        event = None
        for line in r.iter_lines():
            if line.startswith("event: "):
                event = line[len("event: "):]
            elif line.startswith("data: ") and event == "snapshot":
                out.append(json.loads(line[len("data: "):]))
                if len(out) == count:
                    return out
    return out


def test_the_key_guards_the_page_and_its_data(server):
    base = server.base_url
    for path in ("/dashboard", "/dashboard/stream", "/dashboard/snapshot", "/dashboard/block/0",
                 "/dashboard/request/x"):
        r = httpx.get(base + path, timeout=10)
        assert r.status_code == 401, path
        assert "api_key" in r.json()["error"]["message"]
        assert httpx.get(f"{base}{path}?api_key=wrong", timeout=10).status_code == 401
    page = httpx.get(f"{base}/dashboard?api_key={API_KEY}", timeout=10)
    assert page.status_code == 200 and 'id="blockmap"' in page.text and "cdn" not in page.text.lower()
    assert httpx.get(f"{base}/dashboard", headers=server.headers, timeout=10).status_code == 200
    # the static files hold no data: open
    for name in ("dashboard.js", "charts.js", "dashboard.css"):
        assert httpx.get(f"{base}/dashboard/static/{name}", timeout=10).status_code == 200
    assert httpx.get(f"{base}/dashboard/static/secrets.txt", timeout=10).status_code == 404
    # the query key is the live page's only: the API still wants the header
    assert httpx.get(f"{base}/v1/models?api_key={API_KEY}", timeout=10).status_code == 401


def test_stream_shows_running_requests_then_their_traces(server):
    results = []

    def generate(i: int) -> None:
        r = server.post("/v1/completions", json={"model": server.model, "prompt": f"{i} Once upon a time",
                                                 "max_tokens": 40, "temperature": 0, "ignore_eos": True})
        results.append(r.status_code)

    threads = [threading.Thread(target=generate, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    seen: set[str] = set()
    busy = None
    for snap in _snapshots(server, 40):
        assert snap["kv"]["total_blocks"] == 64 and snap["cells"]["count"] == 64
        rows = snap["requests"]["running"]
        seen |= {r["id"] for r in rows}
        if rows and busy is None:
            busy = snap
        if len(seen) >= 4 and busy is not None:
            break
    for t in threads:
        t.join(60)
    assert results == [200] * 6
    assert busy is not None and busy["kv"]["used"] > 0 and busy["requests"]["totals"]["running"] <= 4
    assert all(r["blocks"] > 0 for r in busy["requests"]["running"])
    snap = httpx.get(f"{server.base_url}/dashboard/snapshot", headers=server.headers, timeout=10).json()
    assert snap["requests"]["totals"]["running"] == 0
    finished = {r["id"] for r in snap["requests"]["finished"]}
    assert seen & finished
    rid = next(iter(seen & finished))
    trace = httpx.get(f"{server.base_url}/dashboard/request/{rid}", headers=server.headers, timeout=10).json()
    spans = trace["resourceSpans"][0]["scopeSpans"][0]["spans"]
    assert spans[0]["name"] == "request" and {"prefill", "decode"} <= {s["name"] for s in spans}
    assert max(r[1] for r in snap["series"]) > 0  # output tokens per second
    assert server.post("/v1/completions", json={"model": server.model, "prompt": "x", "max_tokens": 1}).status_code == 200


def test_block_and_request_details(server):
    h = server.headers
    block = httpx.get(f"{server.base_url}/dashboard/block/3", headers=h, timeout=10).json()
    assert block["block_id"] == 3 and block["state"] in ("free", "cached") and block["block_size"] == 4
    for path in ("/dashboard/block/64", "/dashboard/block/-1", "/dashboard/request/nobody"):
        r = httpx.get(server.base_url + path, headers=h, timeout=10)
        assert r.status_code == 404 and r.json()["error"]["type"] == "not_found_error"
    assert httpx.get(f"{server.base_url}/dashboard/block/abc", headers=h, timeout=10).status_code == 400
