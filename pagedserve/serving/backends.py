"""The replicas behind the router: their state, health checks (ejection and readmission) and the load
figures scraped from their /metrics.

A replica is *available* when its last health checks passed and it is not draining. It is ejected
after `eject_after_failures` failed checks in a row, or at once when a request cannot connect to it;
it comes back after `readmit_after_successes` good checks. Everything here runs on the router's event
loop, so plain attributes need no locks.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import httpx
from prometheus_client.parser import text_string_to_metric_families

from pagedserve.serving.config import RouterConfig, TierConfig
from pagedserve.serving.kv_index import KVIndex

logger = logging.getLogger(__name__)


@dataclass(eq=False)
class Backend:
    url: str
    tier: str
    healthy: bool = False  # no request goes to it before a health check has passed
    draining: bool = False  # being stopped (autoscaler, or it said so): no new requests
    in_flight: int = 0  # requests the router has sent it and not finished
    queued_tokens: int = 0  # prompt tokens of those requests not yet answered with a first byte
    num_waiting: float = 0.0  # scraped: vllm:num_requests_waiting
    num_running: float = 0.0  # scraped: vllm:num_requests_running
    kv_usage: float = 0.0  # scraped: vllm:kv_cache_usage_perc
    consecutive_failures: int = 0
    consecutive_successes: int = 0
    ever_healthy: bool = False
    model: str | None = None  # what its /v1/models says
    kv: KVIndex = field(default_factory=KVIndex)

    @property
    def available(self) -> bool:
        return self.healthy and not self.draining

    @property
    def load(self) -> float:
        """Requests at this replica as the router sees them: its own in-flight ones plus the replica's
        waiting queue (which also counts other clients' requests)."""
        return self.in_flight + self.num_waiting


@dataclass
class Tier:
    config: TierConfig
    backends: list[Backend]
    # Woken whenever a replica slot frees up or a replica comes back: queued requests retry then.
    changed: asyncio.Condition = field(default_factory=asyncio.Condition)

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def model(self) -> str | None:
        if self.config.model is not None:
            return self.config.model
        return next((b.model for b in self.backends if b.model), None)

    async def notify(self) -> None:
        async with self.changed:
            self.changed.notify_all()


class BackendPool:
    def __init__(self, config: RouterConfig, client: httpx.AsyncClient,
                 on_eject: Callable[[Backend, str], None] | None = None,
                 on_readmit: Callable[[Backend], None] | None = None) -> None:
        self.config = config
        self.client = client
        self.tiers = {t.name: Tier(t, [Backend(url, t.name) for url in t.replicas]) for t in config.tiers}
        self.on_eject = on_eject
        self.on_readmit = on_readmit
        self._tasks: list[asyncio.Task] = []
        self._kv_tasks: dict[int, asyncio.Task] = {}
        self.track_kv = False  # kv_aware: follow each replica's /kv_events

    def all_backends(self) -> list[Backend]:
        return [b for t in self.tiers.values() for b in t.backends]

    # --- lifecycle ---------------------------------------------------------------------------------

    async def start(self) -> None:
        await asyncio.gather(*(self.check(b) for b in self.all_backends()))  # a first verdict before serving
        self._tasks = [asyncio.create_task(self._health_loop(), name="router-health"),
                       asyncio.create_task(self._metrics_loop(), name="router-metrics")]
        if self.track_kv:
            for b in self.all_backends():
                self._follow_kv(b)

    async def stop(self) -> None:
        tasks = self._tasks + list(self._kv_tasks.values())
        for t in tasks:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t

    def add(self, tier: str, url: str) -> Backend:
        """A new replica (the autoscaler's): it takes requests once a health check passes."""
        b = Backend(url, tier)
        self.tiers[tier].backends.append(b)
        if self.track_kv and self._tasks:
            self._follow_kv(b)
        return b

    def remove(self, backend: Backend) -> None:
        self.tiers[backend.tier].backends.remove(backend)
        task = self._kv_tasks.pop(id(backend), None)
        if task is not None:
            task.cancel()

    # --- health ------------------------------------------------------------------------------------

    async def _health_loop(self) -> None:
        while True:
            await asyncio.sleep(self.config.health_interval_s)
            await asyncio.gather(*(self.check(b) for b in self.all_backends()))

    async def check(self, b: Backend) -> None:
        try:
            r = await self.client.get(f"{b.url}/health", timeout=self.config.health_timeout_s)
            ok = r.status_code == 200
            reason = f"/health answered {r.status_code}"
        except httpx.HTTPError as e:
            ok, reason = False, f"/health failed: {type(e).__name__}"
        if ok and b.model is None:
            with contextlib.suppress(httpx.HTTPError, ValueError, KeyError, IndexError):
                r = await self.client.get(f"{b.url}/v1/models", timeout=self.config.health_timeout_s)
                b.model = r.json()["data"][0]["id"]
        await self.record_check(b, ok, reason)

    async def record_check(self, b: Backend, ok: bool, reason: str = "") -> None:
        if ok:
            b.consecutive_failures = 0
            b.consecutive_successes += 1
            if not b.healthy and b.consecutive_successes >= self.config.readmit_after_successes:
                b.healthy = True
                if b.ever_healthy:
                    logger.info("replica %s readmitted", b.url)
                    if self.on_readmit:
                        self.on_readmit(b)
                b.ever_healthy = True
                await self.tiers[b.tier].notify()
        else:
            b.consecutive_successes = 0
            b.consecutive_failures += 1
            if b.healthy and b.consecutive_failures >= self.config.eject_after_failures:
                self.eject(b, reason)

    def eject(self, b: Backend, reason: str) -> None:
        """Out of rotation until health checks pass again."""
        if not b.healthy:
            return
        b.healthy = False
        b.consecutive_successes = 0
        logger.warning("replica %s ejected: %s", b.url, reason)
        if self.on_eject:
            self.on_eject(b, reason)

    # --- load figures --------------------------------------------------------------------------------

    async def _metrics_loop(self) -> None:
        while True:
            await asyncio.gather(*(self.scrape(b) for b in self.all_backends() if b.healthy))
            await asyncio.sleep(self.config.metrics_interval_s)

    async def scrape(self, b: Backend) -> None:
        try:
            r = await self.client.get(f"{b.url}/metrics", timeout=self.config.health_timeout_s)
            values = parse_metrics(r.text)
        except (httpx.HTTPError, ValueError):
            return  # the health check decides about the replica; stale figures are kept meanwhile
        b.num_waiting = values.get("vllm:num_requests_waiting", 0.0)
        b.num_running = values.get("vllm:num_requests_running", 0.0)
        b.kv_usage = values.get("vllm:kv_cache_usage_perc", 0.0)

    # --- KV events (kv_aware) ------------------------------------------------------------------------

    def _follow_kv(self, b: Backend) -> None:
        self._kv_tasks[id(b)] = asyncio.create_task(self._kv_loop(b), name=f"router-kv-{b.url}")

    async def _kv_loop(self, b: Backend) -> None:
        interval = self.config.kv_aware.poll_interval_s
        while True:
            if b.healthy:
                with contextlib.suppress(httpx.HTTPError, ValueError, KeyError):
                    while await b.kv.poll(self.client, b.url, self.config.health_timeout_s):
                        pass  # more events were waiting: read on at once
            await asyncio.sleep(interval)


def parse_metrics(text: str) -> dict[str, float]:
    """Sample name → value of a Prometheus text page (labelled samples of one name are summed)."""
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if not math.isnan(s.value):
                out[s.name] = out.get(s.name, 0.0) + s.value
    return out
