"""SIGTERM: the server stops accepting, lets in-flight requests finish within the grace period, aborts
the ones that would outlast it (they end with finish_reason "abort", not a cut connection), exits 0."""

from __future__ import annotations

import json
import signal
import threading
import time

import httpx

from tests.server.test_server_support import launch_server

GRACE_S = 2


def test_sigterm_drains_then_exits_0(tiny_llama_dir):
    with launch_server(str(tiny_llama_dir), "--num-blocks", "512", "--num-threads", "1",
                       "--shutdown-timeout", str(GRACE_S)) as server:
        short_events: list[str] = []
        long_events: list[str] = []

        def read(lines, into: list[str]) -> None:
            try:
                for line in lines:
                    if line.startswith("data: "):
                        into.append(line[len("data: "):])
            except httpx.HTTPError:
                into.append("<connection closed>")  # the long one is cut when the grace period ends

        with httpx.Client(base_url=server.base_url, headers=server.headers, timeout=60) as client:
            # short: a few tokens, done well within the grace period; long: 8 sampled sequences of
            # 480 tokens, many seconds of work: it outlasts the grace period and gets aborted
            short = {"prompt": "Hi", "max_tokens": 8, "temperature": 0, "ignore_eos": True, "stream": True}
            long = {"prompt": "Tell me", "max_tokens": 480, "n": 8, "temperature": 1.0, "ignore_eos": True,
                    "stream": True}
            with client.stream("POST", "/v1/completions", json=long) as r_long, \
                    client.stream("POST", "/v1/completions", json=short) as r_short:
                lines_long, lines_short = r_long.iter_lines(), r_short.iter_lines()
                readers = [threading.Thread(target=read, args=(lines_short, short_events)),
                           threading.Thread(target=read, args=(lines_long, long_events))]
                sent = time.monotonic()
                server.proc.send_signal(signal.SIGTERM)
                for t in readers:
                    t.start()
                # it stops accepting new connections
                refused = False
                while not refused and time.monotonic() - sent < GRACE_S:
                    try:
                        httpx.get(f"{server.base_url}/health", timeout=1)
                        time.sleep(0.05)
                    except (httpx.ConnectError, httpx.ReadError, httpx.RemoteProtocolError):
                        refused = True  # refused outright, or reset by a listener that is closing
                assert refused
                for t in readers:
                    t.join(60)
            code = server.proc.wait(30)
            elapsed = time.monotonic() - sent

    assert code == 0, server.log()[-3000:]
    # the in-flight request that fits in the grace period finished normally
    assert short_events[-1] == "[DONE]"
    assert json.loads(short_events[-2])["choices"][0]["finish_reason"] == "length"
    # the one that did not was aborted at the deadline, each of its choices told so
    assert long_events[-1] == "[DONE]"
    finishes = [c["finish_reason"] for e in long_events[:-1] for c in json.loads(e)["choices"] if c["finish_reason"]]
    assert sorted(finishes) == ["abort"] * 8
    assert elapsed < GRACE_S + 10
