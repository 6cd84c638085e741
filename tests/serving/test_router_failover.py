"""Failures and shutdown: a replica killed mid-run loses no request that had not started streaming
(the router retries it on another replica), is ejected, and is readmitted when it comes back on its
port; SIGTERM drains the router (streams in flight finish, new requests are refused, exit 0)."""

from __future__ import annotations

import signal
import threading

import httpx
import pytest

from tests.server.test_server_support import sse_events
from tests.serving.router_support import launch_replica, launch_router, replica_load, wait_until

pytestmark = pytest.mark.slow


def _complete(router, model: str, i: int, results: dict) -> None:
    body = {"model": model, "prompt": f"Request {i}:", "max_tokens": 120, "ignore_eos": True}
    try:
        r = httpx.post(f"{router.base_url}/v1/completions", json=body, timeout=120)
        results[i] = (r.status_code, r.json()["usage"]["completion_tokens"] if r.status_code == 200 else r.text)
    except httpx.HTTPError as e:
        results[i] = (None, repr(e))


def _stream(router, model: str, i: int, results: dict) -> None:
    body = {"model": model, "prompt": f"Stream {i}:", "max_tokens": 120, "ignore_eos": True, "stream": True}
    started = False
    try:
        with httpx.stream("POST", f"{router.base_url}/v1/completions", json=body, timeout=120) as r:
            events = []
            for data in sse_events(r.iter_lines()):
                started = True
                events.append(data)
        results[i] = ("done" if events and events[-1] == "[DONE]" else "cut", started)
    except httpx.HTTPError:
        results[i] = ("error", started)


def test_killed_replica_loses_no_unstarted_request_and_comes_back(tiny_llama_dir):
    model = str(tiny_llama_dir)
    with launch_replica(model) as a, launch_replica(model) as b:
        port_a = int(a.base_url.rsplit(":", 1)[1])
        with launch_router("--backend", a.base_url, "--backend", b.base_url, "--policy", "round_robin",
                           "--eject-after", "1") as router:
            plain: dict = {}
            streams: dict = {}
            threads = [threading.Thread(target=_complete, args=(router, model, i, plain)) for i in range(12)]
            threads += [threading.Thread(target=_stream, args=(router, model, i, streams)) for i in range(6)]
            for t in threads:
                t.start()
            wait_until(lambda: replica_load(a) >= 3, what="requests running on the replica to kill")
            a.proc.kill()  # no goodbye: connections drop mid-request
            for t in threads:
                t.join(120)
            assert all(status == 200 and tokens == 120 for status, tokens in plain.values()), plain
            assert len(plain) == 12 and len(streams) == 6
            # A stream may only fail if it had started (its tokens cannot be taken back); most finish.
            assert all(outcome == "done" or started for outcome, started in streams.values()), streams
            assert router.metric("pagedserve_router_retries_total", tier="default", reason="backend_error") + \
                router.metric("pagedserve_router_retries_total", tier="default", reason="connect_error") >= 1
            router.wait_for(lambda: not router.backend(a.base_url)["healthy"], what="ejection")
            assert router.metric("pagedserve_router_ejections_total", backend=a.base_url) >= 1
            for i in range(4):  # while it is out, everything goes to the other one
                r = httpx.post(f"{router.base_url}/v1/completions", json={"model": model, "prompt": f"x{i}",
                                                                          "max_tokens": 2}, timeout=60)
                assert r.status_code == 200
            with launch_replica(model, port=port_a) as again:
                router.wait_for(lambda: router.backend(again.base_url)["healthy"], timeout=60, what="readmission")
                assert router.metric("pagedserve_router_readmissions_total", backend=again.base_url) >= 1
                before = again.metric("vllm:request_success_total", finished_reason="length")
                for i in range(4):
                    httpx.post(f"{router.base_url}/v1/completions", json={"model": model, "prompt": f"y{i}",
                                                                           "max_tokens": 2}, timeout=60)
                assert again.metric("vllm:request_success_total", finished_reason="length") - before == 2


def test_sigterm_drains_streams_and_refuses_new_requests(tiny_llama_dir):
    model = str(tiny_llama_dir)
    with launch_replica(model) as a, launch_router("--backend", a.base_url) as router:
        body = {"model": model, "prompt": "Drain me:", "max_tokens": 300, "ignore_eos": True, "stream": True}
        with httpx.stream("POST", f"{router.base_url}/v1/completions", json=body, timeout=120) as r:
            events = sse_events(r.iter_lines())
            next(events)
            router.proc.send_signal(signal.SIGTERM)
            wait_until(lambda: _refused(router), what="new requests refused")
            rest = list(events)
        assert rest[-1] == "[DONE]" and len(rest) > 2  # the stream in flight finished
        assert router.proc.wait(30) == 0


def _refused(router) -> bool:
    try:
        r = httpx.post(f"{router.base_url}/v1/completions", json={"model": "m", "prompt": "x"}, timeout=5)
        return r.status_code == 503
    except httpx.HTTPError:
        return True  # no longer accepting connections
