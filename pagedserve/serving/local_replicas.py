"""Local autoscaling: `pagedserve serve` processes on 127.0.0.1 ports, started and stopped as the
autoscaling policy decides.

The CPU's threads are split evenly between `max_replicas` replicas (each gets `--num-threads`), so a
full set does not oversubscribe the machine. A new replica takes requests once its /health passes. A
replica is stopped by draining it first: the router sends it nothing new, waits until the requests it
has there have finished, then sends SIGTERM (the server drains too) — no request is lost.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path

from pagedserve.serving.app import Router
from pagedserve.serving.autoscaler import AutoscalerPolicy, ScaleInputs, p95
from pagedserve.serving.backends import Backend

logger = logging.getLogger(__name__)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class LocalReplica:
    backend: Backend
    proc: subprocess.Popen
    log_path: Path


class LocalReplicaSet:
    def __init__(self, router: Router, tier: str, model: str, serve_args: list[str], threads_per_replica: int,
                 start_timeout_s: float = 180.0, drain_timeout_s: float = 600.0) -> None:
        self.router = router
        self.tier = tier
        self.model = model
        self.serve_args = serve_args
        self.threads = threads_per_replica
        self.start_timeout_s = start_timeout_s
        self.drain_timeout_s = drain_timeout_s
        self.replicas: dict[int, LocalReplica] = {}  # id(backend) → replica
        self.log_dir = Path(tempfile.mkdtemp(prefix="pagedserve-replicas-"))
        self._retiring: set[asyncio.Task] = set()

    @property
    def active(self) -> list[Backend]:
        """Replicas serving or starting; draining ones are on their way out."""
        return [r.backend for r in self.replicas.values() if not r.backend.draining]

    def spawn(self) -> Backend:
        port = free_port()
        cmd = [sys.executable, "-m", "pagedserve.entrypoints.cli", "serve", "--model", self.model,
               "--host", "127.0.0.1", "--port", str(port), "--num-threads", str(self.threads), *self.serve_args]
        log_path = self.log_dir / f"replica-{port}.log"
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    env={**os.environ, "PYTHONUNBUFFERED": "1"})
        backend = self.router.pool.add(self.tier, f"http://127.0.0.1:{port}")
        self.replicas[id(backend)] = LocalReplica(backend, proc, log_path)
        logger.info("replica %s starting (pid %d, %d threads, log %s)", backend.url, proc.pid, self.threads, log_path)
        return backend

    async def wait_healthy(self, backends: list[Backend]) -> None:
        deadline = time.monotonic() + self.start_timeout_s
        while not all(b.healthy for b in backends):
            for b in backends:
                r = self.replicas[id(b)]
                if r.proc.poll() is not None:
                    raise RuntimeError(f"replica {b.url} exited with {r.proc.returncode}: "
                                       f"{r.log_path.read_text(errors='replace')[-2000:]}")
                await self.router.pool.check(b)
            if time.monotonic() > deadline:
                raise TimeoutError(f"replicas not healthy after {self.start_timeout_s:.0f} s")
            await asyncio.sleep(0.2)

    def reap(self) -> None:
        """Forget replicas whose process died (the router has ejected them already): the policy then
        sees fewer replicas and starts new ones."""
        for key, r in list(self.replicas.items()):
            if not r.backend.draining and r.proc.poll() is not None:
                logger.warning("replica %s exited with %s; log: %s", r.backend.url, r.proc.returncode, r.log_path)
                self.router.pool.remove(r.backend)
                del self.replicas[key]

    def retire(self, backend: Backend) -> None:
        """Drain, then stop (in the background)."""
        backend.draining = True
        task = asyncio.create_task(self._retire(backend))
        self._retiring.add(task)
        task.add_done_callback(self._retiring.discard)

    async def _retire(self, backend: Backend) -> None:
        replica = self.replicas[id(backend)]
        deadline = time.monotonic() + self.drain_timeout_s
        while backend.in_flight > 0 and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        await asyncio.to_thread(_stop_process, replica.proc)
        self.router.pool.remove(backend)
        del self.replicas[id(backend)]
        logger.info("replica %s stopped", backend.url)

    async def stop_all(self) -> None:
        for task in list(self._retiring):
            with contextlib.suppress(Exception):
                await task
        procs = [r.proc for r in self.replicas.values()]
        await asyncio.gather(*(asyncio.to_thread(_stop_process, p) for p in procs))
        self.replicas.clear()


def _stop_process(proc: subprocess.Popen, timeout: float = 30.0) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


class LocalAutoscaler:
    """Every `interval_s`: the tier's replica metrics → the policy → spawn or retire replicas."""

    def __init__(self, router: Router, replicas: LocalReplicaSet, policy: AutoscalerPolicy,
                 interval_s: float = 1.0, latency_window_s: float = 30.0) -> None:
        self.router = router
        self.replicas = replicas
        self.policy = policy
        self.interval_s = interval_s
        self.latency_window_s = latency_window_s
        self.latencies: deque[tuple[float, float]] = deque(maxlen=10000)  # (finish time, seconds)
        self._task: asyncio.Task | None = None
        router.on_request_done.append(self._record)

    def _record(self, tier: str, latency_s: float) -> None:
        if tier == self.replicas.tier:
            self.latencies.append((time.monotonic(), latency_s))

    async def start(self) -> None:
        first = [self.replicas.spawn() for _ in range(self.policy.config.min_replicas)]
        await self.replicas.wait_healthy(first)
        self._set_gauges(len(first))
        self._task = asyncio.create_task(self._loop(), name="autoscaler")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self.replicas.stop_all()

    def inputs(self) -> ScaleInputs:
        active = self.replicas.active
        serving = [b for b in active if b.healthy]
        now = time.monotonic()
        while self.latencies and self.latencies[0][0] < now - self.latency_window_s:
            self.latencies.popleft()
        # The router's own queue counts as waiting too (with a per-replica cap, the queue forms there).
        waiting = sum(b.num_waiting for b in serving) + self.router.num_queued
        return ScaleInputs(current=len(active), num_waiting=waiting,
                           kv_usage=sum(b.kv_usage for b in serving) / len(serving) if serving else 0.0,
                           in_flight=sum(b.in_flight for b in active),
                           p95_latency_s=p95([lat for _, lat in self.latencies]),
                           starting=sum(not b.ever_healthy for b in active))

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            try:
                self.tick()
            except Exception:
                logger.exception("autoscaler tick failed")

    def tick(self) -> None:
        self.replicas.reap()
        m = self.inputs()
        d = self.policy.decide(time.monotonic(), m)
        tier = self.replicas.tier
        self.router.metrics.desired.labels(tier).set(d.desired)
        if d.direction == "hold":
            logger.debug("autoscaler: hold at %d (%s)", m.current, d.reason)
            return
        self.router.metrics.scale_decisions.labels(tier, d.direction, d.signal).inc()
        logger.info("autoscaler: %s %d → %d replicas: %s", d.direction, m.current, d.desired, d.reason)
        if d.direction == "up":
            for _ in range(d.desired - m.current):
                self.replicas.spawn()
        else:
            # The idlest go first (then the newest: the oldest have the warmest prefix caches).
            victims = sorted(self.replicas.active, key=lambda b: (b.in_flight, -self.replicas.active.index(b)))
            for b in victims[:m.current - d.desired]:
                self.replicas.retire(b)
        self._set_gauges(d.desired)

    def _set_gauges(self, n: int) -> None:
        self.router.metrics.replicas.labels(self.replicas.tier).set(n)
        self.router.metrics.desired.labels(self.replicas.tier).set(n)
