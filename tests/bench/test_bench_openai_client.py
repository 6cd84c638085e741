"""The OpenAI-API load generator against an in-process fake server (httpx MockTransport): SSE parsing,
per-chunk timestamps, usage, errors, closed-loop concurrency and the loopback-only rule."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest

from pagedserve.bench.metrics import summarize
from pagedserve.bench.runners.openai_client import (
    check_local_url,
    is_token_chunk,
    parse_sse_line,
    run_openai,
)
from pagedserve.bench.workloads import Workload, WorkloadRequest


class FakeServer:
    """Streams max_tokens one-token chunks ~2 ms apart, then a finish chunk, a usage chunk and [DONE]."""

    def __init__(self, fail_ids: frozenset[str] = frozenset()) -> None:
        self.bodies: list[dict] = []
        self.in_flight = 0
        self.max_in_flight = 0
        self.fail_ids = fail_ids

    async def _stream(self, body: dict):
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        yield b": keep-alive comment\n\n"
        for i in range(body["max_tokens"]):
            await asyncio.sleep(0.002)  # the fake model's pacing
            chunk = {"choices": [{"index": 0, "text": f" t{i}", "finish_reason": None}]}
            yield f"data: {json.dumps(chunk)}\n\n".encode()
        yield f"data: {json.dumps({'choices': [{'index': 0, 'text': '', 'finish_reason': 'length'}]})}\n\n".encode()
        usage = {"prompt_tokens": len(body["prompt"].split()), "completion_tokens": body["max_tokens"]}
        self.in_flight -= 1  # done generating (the client stops reading at [DONE], so no finally here)
        yield f"data: {json.dumps({'choices': [], 'usage': usage})}\n\n".encode()
        yield b"data: [DONE]\n\n"

    async def __call__(self, request: httpx.Request) -> httpx.Response:
        if request.url.path == "/v1/models":
            return httpx.Response(200, json={"object": "list", "data": [{"id": "fake-model"}]})
        body = json.loads(request.content)
        self.bodies.append(body)
        if body["prompt"] in self.fail_ids:
            return httpx.Response(429, json={"error": {"message": "queue full"}})
        return httpx.Response(200, headers={"content-type": "text/event-stream"}, content=self._stream(body))


def _workload(n: int, concurrency: int | None = None, fail: tuple[str, ...] = ()) -> Workload:
    reqs = [WorkloadRequest(f"r{i}", fail[i] if i < len(fail) else f"prompt number {i} about tides", 3 + i,
                            arrival_offset=0.01 * i) for i in range(n)]
    return Workload("test", reqs, concurrency=concurrency)


def test_streams_are_timed_per_chunk():
    server = FakeServer()
    run = run_openai(_workload(4), "http://127.0.0.1:9/v1", system="fake", progress=False,
                     transport=httpx.MockTransport(server))
    assert run.config["model"] == "fake-model"
    for body in server.bodies:
        assert body["stream"] is True and body["ignore_eos"] is True and body["temperature"] == 0.0
        assert body["model"] == "fake-model"
    for rec in run.requests:
        assert rec.error is None
        assert rec.output_tokens == rec.max_tokens == len(rec.token_times)  # the finish chunk is not a token
        assert rec.arrival <= rec.first_token <= rec.finish
        assert rec.token_times == sorted(rec.token_times)
        assert rec.prompt_tokens == 5
    s = summarize(run)
    assert s["completed"] == 4 and s["errors"] == 0
    assert s["itl"]["count"] == sum(r.max_tokens - 1 for r in run.requests)
    assert s["itl"]["min"] > 0


def test_http_errors_are_counted_not_raised():
    server = FakeServer(fail_ids=frozenset({"overloaded"}))
    run = run_openai(_workload(3, fail=("overloaded",)), "http://localhost:9", progress=False,
                     transport=httpx.MockTransport(server), model="m")
    errors = [r.error for r in run.requests if r.error]
    assert len(errors) == 1 and errors[0].startswith("HTTP 429")
    assert summarize(run)["errors"] == 1


def test_closed_loop_keeps_concurrency():
    server = FakeServer()
    run = run_openai(_workload(6, concurrency=2), "http://127.0.0.1:9", progress=False,
                     transport=httpx.MockTransport(server), model="m")
    assert all(r.ok for r in run.requests)
    assert server.max_in_flight == 2


def test_run_is_bounded_in_time():
    server = FakeServer()
    wl = Workload("slow", [WorkloadRequest("r0", "p", 2000)])
    run = run_openai(wl, "http://127.0.0.1:9", progress=False, transport=httpx.MockTransport(server), model="m",
                     max_duration=0.2)
    assert run.requests[0].error and "limit" in run.requests[0].error


def test_only_loopback_urls():
    assert check_local_url("http://127.0.0.1:8000/v1/") == "http://127.0.0.1:8000"
    assert check_local_url("http://localhost:8080") == "http://localhost:8080"
    assert check_local_url("http://[::1]:8080") == "http://[::1]:8080"
    for bad in ("http://10.0.0.1:8000", "http://192.168.1.2", "https://api.openai.com", "ftp://127.0.0.1",
                "127.0.0.1:8000"):
        with pytest.raises(ValueError):
            check_local_url(bad)


def test_sse_helpers():
    assert parse_sse_line("") is None and parse_sse_line(": ping") is None and parse_sse_line("event: x") is None
    assert parse_sse_line("data: [DONE]") == "[DONE]"
    assert parse_sse_line('data: {"a": 1}') == {"a": 1}
    assert is_token_chunk({"choices": [{"text": "hi", "finish_reason": None}]})
    assert is_token_chunk({"choices": [{"text": "", "finish_reason": None}]})  # a token that decodes to nothing yet
    assert not is_token_chunk({"choices": [{"text": "", "finish_reason": "length"}]})
    assert is_token_chunk({"choices": [{"text": "!", "finish_reason": "length"}]})
    assert not is_token_chunk({"choices": [], "usage": {"completion_tokens": 3}})


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_against_pagedserve_server(tiny_llama_dir, tmp_path):
    """The real thing: `pagedserve serve` in a subprocess on a loopback port, streamed over real sockets."""
    import importlib.util
    import subprocess
    import sys
    import time

    if importlib.util.find_spec("pagedserve.entrypoints.openai.cli") is None:
        pytest.skip("the OpenAI server is not in this checkout")
    port = _free_port()
    log = open(tmp_path / "server.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "pagedserve.entrypoints.cli", "serve", "--model", str(tiny_llama_dir),
                             "--port", str(port), "--num-blocks", "512", "--block-size", "4", "--max-num-seqs", "4",
                             "--log-level", "warning"], stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 90
        while True:
            assert proc.poll() is None, (tmp_path / "server.log").read_text()
            try:
                if httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "server did not start"
            time.sleep(0.5)
        wl = Workload("real", [WorkloadRequest(f"r{i}", f"Tell me about tides, part {i}.", 4 + i,
                                               arrival_offset=0.05 * i) for i in range(4)])
        run = run_openai(wl, f"http://127.0.0.1:{port}", progress=False, max_duration=60)
        for rec in run.requests:
            assert rec.ok, rec.error
            assert rec.output_tokens == rec.max_tokens  # ignore_eos honoured, counted from the usage chunk
            assert rec.token_times and rec.arrival <= rec.first_token <= rec.finish
            assert rec.prompt_tokens and rec.prompt_tokens > 0
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
