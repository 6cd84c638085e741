"""The router's FastAPI app: the OpenAI endpoints of `pagedserve serve`, forwarded to a replica of the
tier the request's model (or a rule) picks, chosen by the tier's balancing policy.

A request is tried on up to `max_attempts` replicas, but only until its first byte has gone to the
client: a replica that refuses the connection, fails before answering or answers 503 (full, draining)
is skipped for the next one. A streamed response is relayed chunk by chunk as it arrives (the router
holds back only the first chunk, to know that the replica answered); a replica that fails after that
cuts the client's stream, since its tokens cannot be taken back. When every replica of the tier is at
its in-flight cap, requests wait in a bounded queue (beyond it: 503 with Retry-After).
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

import anyio
import httpx
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from pagedserve import __version__
from pagedserve.entrypoints.openai.errors import APIError, bad_request, overloaded, unavailable
from pagedserve.entrypoints.openai.middleware import RequestGuard
from pagedserve.entrypoints.openai.serving_base import ClientDisconnected, until_disconnect
from pagedserve.serving.backends import Backend, BackendPool, Tier
from pagedserve.serving.config import RouterConfig
from pagedserve.serving.metrics import RouterMetrics
from pagedserve.serving.policies import Policy, RouteRequest, make_policy, prompt_text

logger = logging.getLogger(__name__)

_STATUS_TYPES = {401: "authentication_error", 404: "not_found_error", 405: "invalid_request_error"}


class _Retry(Exception):
    """This replica did not answer; the request may go to another (nothing reached the client yet)."""


class Router:
    """The router's state: the replica pool, a policy per tier, the queue, metrics, and the draining flag."""

    def __init__(self, config: RouterConfig, transport: httpx.AsyncBaseTransport | None = None) -> None:
        config.validate()
        self.config = config
        self.metrics = RouterMetrics()
        # Idle connections are dropped before uvicorn's 5 s keep-alive closes them from the replica's side.
        limits = httpx.Limits(max_connections=None, max_keepalive_connections=256, keepalive_expiry=3.0)
        timeout = httpx.Timeout(None, connect=config.connect_timeout_s)  # the request deadline bounds the rest
        # The replicas' key (if they want one) goes with every call: requests, /tokenize, /kv_events.
        auth = {"authorization": f"Bearer {config.backend_api_key}"} if config.backend_api_key else {}
        self.client = httpx.AsyncClient(limits=limits, timeout=timeout, transport=transport, headers=auth)
        self.pool = BackendPool(config, self.client, on_eject=self._ejected, on_readmit=self._readmitted)
        self.policies: dict[str, Policy] = {
            t.name: make_policy(t.policy or config.policy, config.session_header, config.cache_aware, config.kv_aware)
            for t in config.tiers}
        self.pool.track_kv = any(p.name == "kv_aware" for p in self.policies.values())
        self.num_queued = 0
        self.draining = False
        self.on_request_done: list[Callable[[str, float], None]] = []  # (tier, latency s): the autoscaler's p95
        # Started with the app and stopped before the pool (the autoscaler's local replicas).
        self.autoscaler: object | None = None  # local mode's LocalAutoscaler
        self.services: list[tuple[Callable[[], Awaitable[None]], Callable[[], Awaitable[None]]]] = []

    # --- lifecycle ----------------------------------------------------------------------------------

    async def start(self) -> None:
        await self.pool.start()
        for start, _ in self.services:
            await start()
        self._refresh_gauges()

    async def stop(self) -> None:
        for _, stop in reversed(self.services):
            await stop()
        await self.pool.stop()
        await self.client.aclose()

    def _ejected(self, b: Backend, reason: str) -> None:
        self.metrics.ejections.labels(b.url).inc()
        self.metrics.healthy.labels(b.url).set(0)

    def _readmitted(self, b: Backend) -> None:
        self.metrics.readmissions.labels(b.url).inc()

    def _refresh_gauges(self) -> None:
        for b in self.pool.all_backends():
            self.metrics.healthy.labels(b.url).set(1 if b.available else 0)
            self.metrics.in_flight.labels(b.url).set(b.in_flight)
            self.metrics.kv_blocks.labels(b.url).set(len(b.kv.hashes))
        self.metrics.queued.set(self.num_queued)

    # --- tiers ---------------------------------------------------------------------------------------

    def resolve_tier(self, body: dict, headers: dict[str, str], text: str) -> Tier:
        """The tier whose model the request names; else the first rule that matches (the body's model is
        then rewritten to the tier's); a single tier takes every request."""
        model = body.get("model")
        for tier in self.pool.tiers.values():
            if tier.model is not None and tier.model == model:
                return tier
        for rule in self.config.rules:
            if rule.matches(headers, len(text)):
                tier = self.pool.tiers[rule.tier]
                if tier.model is not None:
                    body["model"] = tier.model
                return tier
        if len(self.pool.tiers) == 1 and not self.config.rules:
            return next(iter(self.pool.tiers.values()))  # the replicas themselves judge the model name
        known = sorted(t.model for t in self.pool.tiers.values() if t.model)
        raise APIError(404, f"model {model!r} is not served here; models: {', '.join(known)}",
                       "invalid_request_error", "model", "model_not_found")

    # --- choosing a replica --------------------------------------------------------------------------

    async def acquire(self, tier: Tier, policy: Policy, req: RouteRequest, tried: set[str], deadline: float,
                      prepared: list[bool]) -> Backend | None:
        """A replica slot for this attempt (None: every available replica was tried already). Waits in
        the bounded queue while every untried replica is at its cap or none has started yet."""
        cap = self.config.max_in_flight_per_replica
        queued_at: float | None = None
        try:
            while True:
                if self.draining:
                    raise unavailable("the router is shutting down")
                available = [b for b in tier.backends if b.available]
                starting = any(not b.ever_healthy and not b.draining for b in tier.backends)
                if not available and not starting:
                    self.metrics.rejected.labels("no_replica").inc()
                    raise APIError(503, f"no healthy replica in tier {tier.name!r}", "service_unavailable", None,
                                   "no_healthy_replica", headers={"Retry-After": "1"})
                untried = [b for b in available if b.url not in tried]
                if available and not untried:
                    return None
                free = [b for b in untried if b.in_flight < cap]
                if free:
                    if not prepared[0]:
                        await policy.prepare(req, free, self.client)
                        prepared[0] = True
                    backend, reason = policy.choose(free, req)
                    backend.in_flight += 1
                    self.metrics.decisions.labels(tier.name, policy.name, backend.url, reason).inc()
                    return backend
                now = time.monotonic()
                if queued_at is None:
                    if self.num_queued >= self.config.max_queued_requests:
                        self.metrics.rejected.labels("queue_full").inc()
                        raise overloaded(f"every replica of tier {tier.name!r} is at its limit and "
                                         f"{self.num_queued} requests are queued")
                    queued_at = now
                    self.num_queued += 1
                    self.metrics.queued.set(self.num_queued)
                if now >= deadline:
                    raise APIError(504, "the request deadline passed while it waited for a replica",
                                   "timeout_error", None, "deadline_exceeded")
                if now - queued_at > self.config.max_queue_wait_s:
                    self.metrics.rejected.labels("queue_timeout").inc()
                    raise overloaded(f"no replica of tier {tier.name!r} freed up in {self.config.max_queue_wait_s:.0f} s")
                async with tier.changed:
                    try:  # woken when a slot frees or a replica returns; rechecks at least each second
                        await asyncio.wait_for(tier.changed.wait(), min(deadline - now, 1.0))
                    except asyncio.TimeoutError:
                        pass
        finally:
            if queued_at is not None:
                self.num_queued -= 1
                self.metrics.queued.set(self.num_queued)

    async def release(self, b: Backend, charge: int) -> None:
        b.in_flight -= 1
        b.queued_tokens -= charge
        self.metrics.in_flight.labels(b.url).set(b.in_flight)
        await self.pool.tiers[b.tier].notify()

    # --- forwarding ----------------------------------------------------------------------------------

    async def forward(self, endpoint: str, request: Request) -> Response:
        arrival = time.monotonic()
        if self.draining:
            raise unavailable("the router is shutting down")
        raw = await request.body()
        try:
            body = json.loads(raw)
        except ValueError as e:
            raise bad_request(f"the request body is not valid JSON: {e}", None, "invalid_json") from None
        if not isinstance(body, dict):
            raise bad_request("the request body must be a JSON object")
        if not isinstance(body.get("model"), str):
            raise bad_request("model is required and must be a string", "model")
        stream = body.get("stream", False)
        if not isinstance(stream, bool) and stream is not None:
            raise bad_request("stream must be a boolean", "stream")
        headers = {k.lower(): v for k, v in request.headers.items()}
        text = prompt_text(endpoint, body)
        model_before = body["model"]
        tier = self.resolve_tier(body, headers, text)
        content = raw if body["model"] == model_before else json.dumps(body).encode()
        policy = self.policies[tier.name]
        req = RouteRequest(endpoint, body, headers, text)
        deadline = arrival + self.config.request_timeout_s
        tried: set[str] = set()
        prepared = [False]
        refusal: httpx.Response | None = None
        refusal_body = b""
        failed: str | None = None  # why the previous attempt failed
        for _ in range(self.config.max_attempts):
            backend = await self.acquire(tier, policy, req, tried, deadline, prepared)
            if backend is None:
                break
            if failed is not None:
                self.metrics.retries.labels(tier.name, failed).inc()
            tried.add(backend.url)
            charge = policy.on_routed(backend, req)
            backend.queued_tokens += charge
            self.metrics.in_flight.labels(backend.url).set(backend.in_flight)
            try:
                return await self._attempt(request, backend, tier, endpoint, content, bool(stream), arrival,
                                           deadline, charge)
            except _Retry as r:
                failed = str(r)
                if isinstance(r.__cause__, _Refused):
                    refusal, refusal_body = r.__cause__.response, r.__cause__.body
        if refusal is not None:  # every replica tried was full or draining: their 503, with Retry-After
            self.metrics.rejected.labels("replicas_full").inc()
            self.metrics.requests.labels(tier.name, "none", "503").inc()
            retry_after = refusal.headers.get("retry-after", "1")
            return Response(refusal_body, 503, headers={"Retry-After": retry_after},
                            media_type=refusal.headers.get("content-type", "application/json"))
        self.metrics.rejected.labels("replicas_failed").inc()
        raise APIError(503, f"no replica of tier {tier.name!r} could take the request ({len(tried)} tried)",
                       "service_unavailable", None, "no_healthy_replica", headers={"Retry-After": "1"})

    async def _attempt(self, raw: Request, b: Backend, tier: Tier, endpoint: str, content: bytes, stream: bool,
                       arrival: float, deadline: float, charge: int) -> Response:
        """One replica's try. Raises _Retry (with the slot released) when the request may go elsewhere.
        A client that leaves before its answer has its replica request cancelled (the connection to the
        replica closes, and the replica aborts the request and frees its blocks)."""
        headers = {"content-type": "application/json"}
        upstream: httpx.Response | None = None
        handed_over = False
        try:
            try:
                upstream = await until_disconnect(raw, asyncio.wait_for(
                    self.client.send(self.client.build_request("POST", b.url + endpoint, content=content,
                                                               headers=headers), stream=True),
                    _remaining(deadline)))
                if upstream.status_code == 503:  # full or draining: another replica may take it
                    body = await asyncio.wait_for(upstream.aread(), _remaining(deadline))
                    raise _Retry("backend_503") from _Refused(upstream, body)
                if not stream or upstream.status_code != 200:
                    data = await until_disconnect(raw, asyncio.wait_for(upstream.aread(), _remaining(deadline)))
                    self._count(b, tier, upstream.status_code, arrival, done=True)
                    return Response(data, upstream.status_code,
                                    media_type=upstream.headers.get("content-type", "application/json"))
                chunks = upstream.aiter_raw()
                try:
                    first = await asyncio.wait_for(chunks.__anext__(), _remaining(deadline))
                except StopAsyncIteration:
                    first = b""
            except (httpx.ConnectError, httpx.ConnectTimeout) as e:
                self.pool.eject(b, f"connection failed: {type(e).__name__}")
                raise _Retry("connect_error") from None
            except (httpx.TransportError, httpx.StreamError):
                # A dropped connection (a dying replica, or a pooled connection its server had just
                # closed): retry elsewhere, and let the health checks judge the replica.
                raise _Retry("backend_error") from None
            except asyncio.TimeoutError:
                raise APIError(504, "the request deadline passed before the replica answered", "timeout_error",
                               None, "deadline_exceeded") from None
            except ClientDisconnected:
                self._count(b, tier, "client_closed", arrival, done=False)
                return Response(status_code=499)  # nobody reads it
            # Committed: the first byte is here, so this replica is the one (no retry from now on).
            b.queued_tokens -= charge
            charge = 0
            self.metrics.ttfb.labels(tier.name).observe(time.monotonic() - arrival)
            handed_over = True
            passed = {k: v for k, v in upstream.headers.items() if k.lower() in ("cache-control", "x-accel-buffering")}
            done = _Once(functools.partial(self._finish_stream, b, tier, upstream, arrival))
            return _RelayResponse(self._relay(b, tier, chunks, first, deadline, done), done, 200, headers=passed,
                                  media_type=upstream.headers.get("content-type", "text/event-stream"))
        finally:
            if not handed_over:
                if upstream is not None:
                    await upstream.aclose()
                await self.release(b, charge)

    async def _relay(self, b: Backend, tier: Tier, chunks: AsyncIterator[bytes], first: bytes, deadline: float,
                     done: _Once) -> AsyncIterator[bytes]:
        try:
            if first:
                yield first
            while True:
                try:
                    chunk = await asyncio.wait_for(chunks.__anext__(), _remaining(deadline))
                except StopAsyncIteration:
                    break
                yield chunk
        except (httpx.TransportError, httpx.StreamError) as e:
            # Tokens went out already: no retry. Cut the client's stream so it sees the failure.
            done.status = "stream_error"
            logger.warning("replica %s failed mid-stream: %s", b.url, type(e).__name__)
            raise
        except asyncio.TimeoutError:
            done.status = "deadline"
            logger.warning("request to %s passed its deadline mid-stream", b.url)
            raise
        except (asyncio.CancelledError, GeneratorExit):
            done.status = "client_closed"
            raise
        finally:
            with anyio.CancelScope(shield=True):  # a client that left cancels us: finish the bookkeeping
                await done()

    async def _finish_stream(self, b: Backend, tier: Tier, upstream: httpx.Response, arrival: float,
                             status: str) -> None:
        self._count(b, tier, status, arrival, done=True)
        await upstream.aclose()  # closing it early aborts the request at the replica
        await self.release(b, 0)

    def _count(self, b: Backend, tier: Tier, status: int | str, arrival: float, done: bool) -> None:
        self.metrics.requests.labels(tier.name, b.url, str(status)).inc()
        if done:
            latency = time.monotonic() - arrival
            self.metrics.latency.labels(tier.name).observe(latency)
            for hook in self.on_request_done:
                hook(tier.name, latency)


class _Once:
    """A streamed response's bookkeeping, run exactly once: by the relay's end, or by the response
    itself when the relay never started (a client that left before the first chunk was sent)."""

    def __init__(self, finish: Callable[[str], Awaitable[None]]) -> None:
        self.finish = finish
        self.status = "200"
        self.ran = False

    async def __call__(self) -> None:
        if not self.ran:
            self.ran = True
            await self.finish(self.status)


class _RelayResponse(StreamingResponse):
    def __init__(self, content: AsyncIterator[bytes], done: _Once, status_code: int, headers: dict[str, str],
                 media_type: str) -> None:
        super().__init__(content, status_code, headers=headers, media_type=media_type)
        self.done = done

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            with anyio.CancelScope(shield=True):
                await self.done()


class _Refused(Exception):
    def __init__(self, response: httpx.Response, body: bytes) -> None:
        super().__init__("refused")
        self.response = response
        self.body = body


def _remaining(deadline: float) -> float:
    return max(deadline - time.monotonic(), 0.001)


def build_router_app(router: Router) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await router.start()
        logger.info("routing %s", ", ".join(f"{t.name}: {len(t.backends)} replicas"
                                             for t in router.pool.tiers.values()))
        try:
            yield
        finally:
            await router.stop()

    app = FastAPI(title="pagedserve router", version=__version__, lifespan=lifespan)
    app.state.router = router
    app.add_middleware(RequestGuard, api_key=router.config.api_key, max_body_bytes=router.config.max_body_bytes)

    @app.exception_handler(APIError)
    async def _api_error(request: Request, e: APIError) -> JSONResponse:
        return e.response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, e: StarletteHTTPException) -> JSONResponse:
        return APIError(e.status_code, str(e.detail), _STATUS_TYPES.get(e.status_code, "invalid_request_error")).response()

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await router.forward("/v1/completions", request)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        return await router.forward("/v1/chat/completions", request)

    @app.post("/v1/embeddings")
    async def embeddings(request: Request) -> Response:
        return await router.forward("/v1/embeddings", request)

    @app.get("/v1/models")
    async def models() -> JSONResponse:
        now = int(time.time())
        cards = [{"id": t.model, "object": "model", "created": now, "owned_by": "pagedserve", "root": t.name}
                 for t in router.pool.tiers.values() if t.model]
        return JSONResponse({"object": "list", "data": cards})

    @app.get("/health")
    async def health() -> Response:
        if router.draining:
            return unavailable("the router is shutting down").response()
        if not any(b.available for b in router.pool.all_backends()):
            return unavailable("no healthy replica").response()
        return Response(status_code=200)

    @app.get("/version")
    async def version() -> dict[str, str]:
        return {"version": __version__}

    @app.get("/metrics")
    async def metrics() -> Response:
        router._refresh_gauges()
        content, content_type = router.metrics.render()
        return Response(content, media_type=content_type)

    @app.get("/router/backends")
    async def backends() -> JSONResponse:
        """Each replica as the router sees it (for people and tests; the metrics carry the same figures)."""
        return JSONResponse([{"url": b.url, "tier": b.tier, "healthy": b.healthy, "draining": b.draining,
                              "in_flight": b.in_flight, "num_waiting": b.num_waiting, "kv_usage": b.kv_usage,
                              "kv_blocks": len(b.kv.hashes), "kv_synced": b.kv.synced,
                              "kv_last_seq": b.kv.last_seq, "model": b.model}
                             for b in router.pool.all_backends()])

    return app
