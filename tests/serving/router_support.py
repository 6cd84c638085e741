"""Helpers for the router tests: a real `pagedserve router` process on 127.0.0.1 in front of real
`pagedserve serve` processes (tests/server/test_server_support.py's), killed at the end even on failure."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import psutil

from tests.server.test_server_support import REPO, ServerProcess, free_port, launch_server, stop_process

# Tiny replicas: small blocks so short prompts fill several, one thread each (2 cores, several processes).
REPLICA_ARGS = ("--num-blocks", "256", "--block-size", "4", "--num-threads", "1", "--max-num-seqs", "4",
                "--max-queued-requests", "16")


@dataclass
class RouterProcess(ServerProcess):
    def backends(self) -> list[dict]:
        return httpx.get(f"{self.base_url}/router/backends", timeout=10).json()

    def backend(self, url: str) -> dict:
        return next(b for b in self.backends() if b["url"] == url)

    def wait_for(self, predicate, timeout: float = 30.0, what: str = "condition") -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            if self.proc.poll() is not None:
                raise RuntimeError(f"router exited with {self.proc.returncode}:\n{self.log()[-4000:]}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"{what} not reached after {timeout}s; backends: {self.backends()}")
            time.sleep(0.05)

    def decisions(self) -> dict[str, float]:
        """Routing decisions per replica URL."""
        out: dict[str, float] = {}
        for (name, labels), value in self.metrics().items():
            if name == "pagedserve_router_routing_decisions_total":
                url = dict(labels)["backend"]
                out[url] = out.get(url, 0.0) + value
        return out


@contextlib.contextmanager
def launch_replica(model: str, *args: str, port: int | None = None, ready_timeout: float = 120.0
                   ) -> Iterator[ServerProcess]:
    """A tiny replica (no API key) on `port` (a free one by default), so a test can bring one back on
    the port it had; always killed on exit."""
    port = port or free_port()
    cmd = [sys.executable, "-m", "pagedserve.entrypoints.cli", "serve", "--model", model, "--host", "127.0.0.1",
           "--port", str(port), "--log-level", "warning", *REPLICA_ARGS, *args]
    log = tempfile.NamedTemporaryFile(prefix="pagedserve-replica-", suffix=".log", delete=False)
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env=env)
    server = ServerProcess(proc, f"http://127.0.0.1:{port}", model, None, Path(log.name))
    try:
        deadline = time.monotonic() + ready_timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"replica exited with {proc.returncode}:\n{server.log()[-4000:]}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{server.base_url}/health", timeout=2).status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise TimeoutError(f"replica not ready after {ready_timeout}s:\n{server.log()[-4000:]}")
            time.sleep(0.2)
        yield server
    finally:
        stop_process(proc)
        log.close()
        with contextlib.suppress(OSError):
            os.unlink(log.name)


@contextlib.contextmanager
def launch_replicas(model: str, n: int, *args: str) -> Iterator[list[ServerProcess]]:
    with contextlib.ExitStack() as stack:
        yield [stack.enter_context(launch_server(model, *REPLICA_ARGS, *args, api_key=None)) for _ in range(n)]


@contextlib.contextmanager
def launch_router(*args: str, api_key: str | None = None, ready_timeout: float = 180.0,
                  wait_healthy: bool = True) -> Iterator[RouterProcess]:
    """`pagedserve router ARGS` on a free loopback port; always killed on exit."""
    port = free_port()
    cmd = [sys.executable, "-m", "pagedserve.entrypoints.cli", "router", "--host", "127.0.0.1", "--port", str(port),
           "--log-level", "info", "--health-interval", "0.2", *args]
    if api_key:
        cmd += ["--api-key", api_key]
    log = tempfile.NamedTemporaryFile(prefix="pagedserve-router-", suffix=".log", delete=False)
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env=env)
    router = RouterProcess(proc, f"http://127.0.0.1:{port}", "", api_key, Path(log.name))
    children: list[psutil.Process] = []
    try:
        deadline = time.monotonic() + ready_timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"router exited with {proc.returncode}:\n{router.log()[-4000:]}")
            with contextlib.suppress(httpx.HTTPError):
                status = httpx.get(f"{router.base_url}/health", timeout=2).status_code
                if status == 200 or (status == 503 and not wait_healthy):
                    break
            if time.monotonic() > deadline:
                raise TimeoutError(f"router not ready after {ready_timeout}s:\n{router.log()[-4000:]}")
            time.sleep(0.1)
        yield router
    finally:
        # The replicas an autoscaling router started: killed too if the router could not stop them.
        with contextlib.suppress(psutil.Error):
            children = psutil.Process(proc.pid).children(recursive=True)
        stop_process(proc, timeout=60)
        for child in children:
            with contextlib.suppress(psutil.Error):
                child.kill()
        log.close()
        with contextlib.suppress(OSError):
            os.unlink(log.name)


def backend_args(replicas: list[ServerProcess]) -> list[str]:
    return [a for r in replicas for a in ("--backend", r.base_url)]


LONG = {"max_tokens": 500, "temperature": 1.0, "ignore_eos": True}  # a second or two of a tiny replica's work


class HeldRequests:
    """Long streamed completions sent straight to a replica (not through the router), each sent again as
    soon as it ends, to keep the replica busy or full until the block exits; closing their connections
    aborts them."""

    def __init__(self, url: str, model: str, n: int) -> None:
        self.url, self.model, self.n = url, model, n
        self.clients: list[httpx.Client] = []
        self.threads: list[threading.Thread] = []
        self.statuses: list[int] = []
        self.stop = threading.Event()

    def _run(self, i: int) -> None:
        client = httpx.Client(timeout=120)
        self.clients.append(client)
        body = {"model": self.model, "prompt": f"Busy work number {i}:", "stream": True, **LONG}
        while not self.stop.is_set():
            try:
                with client.stream("POST", f"{self.url}/v1/completions", json=body) as r:
                    self.statuses.append(r.status_code)
                    for _ in r.iter_raw():
                        pass
            except (httpx.HTTPError, RuntimeError):
                return

    def __enter__(self) -> HeldRequests:
        for i in range(self.n):
            t = threading.Thread(target=self._run, args=(i,), daemon=True)
            t.start()
            self.threads.append(t)
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for c in list(self.clients):
            with contextlib.suppress(Exception):
                c.close()
        for t in self.threads:
            t.join(30)


def replica_load(replica: ServerProcess) -> float:
    m = replica.metrics()
    return m[("vllm:num_requests_running", ())] + m[("vllm:num_requests_waiting", ())]


def wait_until(predicate, timeout: float = 30.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} not reached after {timeout}s")
        time.sleep(0.05)
