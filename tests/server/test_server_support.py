"""Helpers for the server tests: a real `pagedserve serve` process on 127.0.0.1 and ways to talk to it.

No tests here; the server test modules import `launch_server` and wrap it in a fixture whose
teardown always kills the process.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

REPO = Path(__file__).resolve().parents[2]
API_KEY = "test-key"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class ServerProcess:
    proc: subprocess.Popen
    base_url: str
    model: str
    api_key: str | None
    log_path: Path

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def openai(self, **kwargs):
        import openai

        return openai.OpenAI(base_url=f"{self.base_url}/v1", api_key=self.api_key or "none", max_retries=0,
                             timeout=60, **kwargs)

    def http(self, timeout: float = 60) -> httpx.Client:
        return httpx.Client(base_url=self.base_url, headers=self.headers, timeout=timeout)

    def post(self, path: str, **kwargs) -> httpx.Response:
        with self.http() as c:
            return c.post(path, **kwargs)

    def metrics(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        """{(sample name, sorted labels without model_name): value}, parsed by prometheus_client."""
        text = httpx.get(f"{self.base_url}/metrics", timeout=30).text
        out = {}
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                labels = tuple(sorted((k, v) for k, v in s.labels.items() if k != "model_name"))
                out[(s.name, labels)] = s.value
        return out

    def metric(self, name: str, **labels: str) -> float:
        return self.metrics().get((name, tuple(sorted(labels.items()))), 0.0)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_idle(self, timeout: float = 20.0) -> dict:
        """Poll /metrics until nothing runs or waits and every KV block is free; returns the metrics."""
        deadline = time.monotonic() + timeout
        while True:
            m = self.metrics()
            idle = (m[("vllm:num_requests_running", ())] == 0 and m[("vllm:num_requests_waiting", ())] == 0
                    and m[("pagedserve:kv_blocks_free", ())] == m[("pagedserve:kv_blocks_total", ())])
            if idle or time.monotonic() > deadline:
                return m
            time.sleep(0.05)


def _wait_ready(server: ServerProcess, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.proc.poll() is not None:
            raise RuntimeError(f"server exited with {server.proc.returncode}:\n{server.log()[-4000:]}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{server.base_url}/health", timeout=2).status_code == 200:
                return
        time.sleep(0.2)
    raise TimeoutError(f"server not ready after {timeout}s:\n{server.log()[-4000:]}")


def stop_process(proc: subprocess.Popen, timeout: float = 15.0) -> int:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            return proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
    return proc.wait()


@contextlib.contextmanager
def launch_server(model: str, *args: str, api_key: str | None = API_KEY,
                  ready_timeout: float = 120.0) -> Iterator[ServerProcess]:
    """`pagedserve serve --model MODEL ARGS` on a free loopback port; always killed on exit."""
    port = free_port()
    cmd = [sys.executable, "-m", "pagedserve.entrypoints.cli", "serve", "--model", model,
           "--host", "127.0.0.1", "--port", str(port), "--log-level", "warning", *args]
    if api_key:
        cmd += ["--api-key", api_key]
    log = tempfile.NamedTemporaryFile(prefix="pagedserve-server-", suffix=".log", delete=False)
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env=env)
    server = ServerProcess(proc, f"http://127.0.0.1:{port}", model, api_key, Path(log.name))
    try:
        _wait_ready(server, ready_timeout)
        yield server
    finally:
        stop_process(proc)
        log.close()
        with contextlib.suppress(OSError):
            os.unlink(log.name)


def sse_events(lines: Iterator[str]) -> Iterator[str]:
    """The data payloads of an SSE stream, up to and including [DONE]."""
    for line in lines:
        if line.startswith("data: "):
            yield line[len("data: "):]
