"""pagedserve on Ray Serve: `pagedserve serve --ray ...` or `python -m pagedserve.serving.ray_app ...`.

Two deployments make the application:

- `PagedServeEngine`: one replica = one engine. Each replica builds the OpenAI server's own FastAPI app
  (`api_server.build_app`: the in-process AsyncLLMEngine, validation, streaming, errors, API key,
  metrics) and answers the HTTP requests forwarded to it by running that app in process
  (`relay_asgi`), so request handling is written once. Ray Serve's autoscaler sizes it
  (`autoscaling_config` from the same options as the router's autoscaler).
- `PagedServeIngress`: behind Ray Serve's HTTP proxy, a FastAPI app that reads the body, puts the
  prompt text beside it (`HTTPForward.route_text`) and calls the engine deployment through a
  DeploymentHandle whose request router (`ray_router.py`) runs pagedserve's cache_aware or
  least_loaded policy.

Why an ingress deployment: the proxy sends a replica only the ASGI scope and lets the replica pull the
body afterwards, so a request router in front of the engine replicas could never see the prompt. Behind
the ingress the prompt is an argument of the handle call, which is what request routers read.

Nothing outside this module and `ray_router.py` imports ray.
"""

# No `from __future__ import annotations` here: Ray Serve rebuilds the ingress's route signatures and
# FastAPI must see real classes (Request), not strings.
import asyncio
import json
import logging
import signal
import sys
import threading
import warnings
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import Response, StreamingResponse
from ray import serve
from ray.serve.config import RequestRouterConfig
from ray.serve.deployment import Application
from ray.serve.handle import DeploymentHandle, DeploymentResponseGenerator

from pagedserve.entrypoints.openai.errors import unavailable
from pagedserve.entrypoints.openai.serving_base import ServerConfig
from pagedserve.serving.policies import prompt_text
from pagedserve.serving.ray_options import RayServeOptions
from pagedserve.serving.ray_router import HTTPForward

logger = logging.getLogger(__name__)

ENGINE_DEPLOYMENT = "PagedServeEngine"
INGRESS_DEPLOYMENT = "PagedServeIngress"
REPLICA_HEADER = "x-pagedserve-replica"  # which engine replica answered (a response header)
ROUTER_CLASS = "pagedserve.serving.ray_router.PagedServeRequestRouter"
DISCONNECT_GRACE_S = 5.0  # how long the engine app gets to see a disconnect and abort, before it is cancelled


@dataclass
class ResponseStart:
    """The first item an engine replica yields: the status and headers; body chunks (bytes) follow."""

    status: int
    headers: list[tuple[bytes, bytes]]


ASGIApp = Callable[[dict, Callable[[], Awaitable[dict]], Callable[[dict], Awaitable[None]]], Awaitable[None]]


async def relay_asgi(app: ASGIApp, fwd: HTTPForward, extra_headers: list[tuple[bytes, bytes]] = ()
                     ) -> AsyncIterator[ResponseStart | bytes]:
    """Run one HTTP request through `app` in process: yields its ResponseStart, then its body chunks as
    the app sends them (a stream stays a stream). Closing the iterator early is a client disconnect:
    the app's `receive` returns http.disconnect, so it aborts the request as it would for a socket."""
    scope = {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "http_version": "1.1",
             "method": fwd.method, "scheme": "http", "path": fwd.path, "raw_path": fwd.path.encode(),
             "query_string": fwd.query_string, "root_path": "", "headers": list(fwd.headers),
             "client": fwd.client, "server": ("127.0.0.1", 80), "state": {}}
    messages: asyncio.Queue[dict | None] = asyncio.Queue()
    disconnected = asyncio.Event()
    body_sent = False

    async def receive() -> dict:
        nonlocal body_sent
        if not body_sent:
            body_sent = True
            return {"type": "http.request", "body": fwd.body, "more_body": False}
        await disconnected.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict) -> None:
        await messages.put(message)

    async def run() -> None:
        try:
            await app(scope, receive, send)
        finally:
            messages.put_nowait(None)

    task = asyncio.ensure_future(run())
    try:
        while (message := await messages.get()) is not None:
            if message["type"] == "http.response.start":
                yield ResponseStart(message["status"], [*message.get("headers", []), *extra_headers])
            elif message["type"] == "http.response.body":
                if message.get("body"):
                    yield message["body"]
                if not message.get("more_body", False):
                    break
    finally:
        disconnected.set()
        done, _ = await asyncio.wait({task}, timeout=DISCONNECT_GRACE_S)
        if not done:
            task.cancel()
        elif not task.cancelled() and task.exception() is not None:  # its error handlers answered already
            logger.error("request %s %s failed in the engine app: %r", fwd.method, fwd.path, task.exception())


class EngineReplica:
    """One engine replica: `pagedserve serve`'s own app, answering forwarded requests in process."""

    async def __init__(self, model: str, engine_kwargs: dict[str, Any], server_config: ServerConfig) -> None:
        from pagedserve.config import EngineConfig
        from pagedserve.entrypoints.openai.api_server import build_app

        self.replica_id = serve.get_replica_context().replica_id.unique_id
        engine_config = EngineConfig.from_kwargs(model, **engine_kwargs)
        # Loading the model blocks: off the replica's event loop, which answers Ray's health checks.
        self.app = await asyncio.to_thread(build_app, engine_config, server_config)
        self.engine = self.app.state.async_engine
        self._lifespan = self.app.router.lifespan_context(self.app)
        await self._lifespan.__aenter__()  # starts the engine loop on this event loop
        self._replica_header = [(REPLICA_HEADER.encode(), self.replica_id.encode())]
        logger.info("engine replica %s serving %s", self.replica_id, server_config.served_model_name)

    async def answer(self, fwd: HTTPForward) -> AsyncIterator[ResponseStart | bytes]:
        async for item in relay_asgi(self.app, fwd, self._replica_header):
            yield item

    async def record_routing_stats(self) -> dict[str, float]:
        """What the request router's least_loaded reads besides its own in-flight counts."""
        stats = await self.engine.stats()
        return {"num_waiting": float(stats.num_waiting), "num_running": float(stats.num_running),
                "kv_usage": stats.kv.utilization}

    def check_health(self) -> None:
        reason = self.engine.unavailable_reason
        if reason is not None:  # Ray Serve replaces a replica whose engine loop died
            raise RuntimeError(reason)

    async def __del__(self) -> None:
        # Ray Serve calls this once the replica's requests have finished (or its graceful timeout passed).
        lifespan, self._lifespan = getattr(self, "_lifespan", None), None
        if lifespan is not None:
            await lifespan.__aexit__(None, None, None)


# Defined before the ingress class: `serve.ingress` serializes the class when it decorates it, so the
# module-level names its methods use must exist by then.
async def _rest(gen: DeploymentResponseGenerator) -> AsyncIterator[bytes]:
    finished = False
    try:
        async for chunk in gen:
            yield chunk
        finished = True
    finally:
        if not finished:  # the client left: cancelling the call aborts the request at the engine
            gen.cancel()


def make_forward(request: Request, body: bytes) -> HTTPForward:
    parsed: Any = None
    if request.method == "POST" and body:
        try:
            parsed = json.loads(body)
        except ValueError:
            parsed = None  # the engine app answers it with its own 400
    fields = parsed if isinstance(parsed, dict) else {}
    client = (request.client.host, request.client.port) if request.client else None
    path = request.scope["path"]
    return HTTPForward(method=request.method, path=path, query_string=request.scope.get("query_string", b""),
                       headers=list(request.headers.raw), body=body, client=client,
                       route_text=prompt_text(path, fields) if fields else "",
                       prompt=fields.get("prompt"), messages=fields.get("messages"))


ingress_app = FastAPI(title="pagedserve on Ray Serve")


@serve.ingress(ingress_app)
class Ingress:
    """Reads each request's body for its prompt and hands the request to an engine replica."""

    def __init__(self, engine: DeploymentHandle) -> None:
        self.engine = engine.options(stream=True)

    @ingress_app.api_route("/{path:path}", methods=["GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS"])
    async def forward(self, path: str, request: Request) -> Response:
        body = await request.body()
        fwd = make_forward(request, body)
        gen: DeploymentResponseGenerator = self.engine.answer.remote(fwd)
        try:
            start = await gen.__anext__()
        except asyncio.CancelledError:  # the client left before the response started
            gen.cancel()
            raise
        except Exception as e:  # no replica could take it (one died, the deployment is gone)
            gen.cancel()
            logger.warning("%s %s: no engine replica answered: %r", request.method, request.url.path, e)
            return unavailable(f"no engine replica answered: {type(e).__name__}").response()
        response = StreamingResponse(_rest(gen), status_code=start.status)
        response.raw_headers = start.headers  # the engine app's own (content type and length, SSE headers)
        return response


def build_app(model: str, engine_kwargs: dict[str, Any], server_config: ServerConfig,
              opts: RayServeOptions) -> Application:
    """The Ray Serve application: the ingress in front of the autoscaled engine deployment."""
    opts.validate()
    # One replica's torch threads: its Ray CPUs unless the engine options say otherwise.
    engine_kwargs = {"num_threads": max(1, int(opts.replica_cpus)), **engine_kwargs}
    routing: dict[str, Any] = {}
    if opts.policy != "power_of_two":  # Ray's default router otherwise
        routing["request_router_config"] = RequestRouterConfig(
            request_router_class=ROUTER_CLASS, request_router_kwargs=opts.router_kwargs(),
            request_routing_stats_period_s=opts.routing_stats_period_s)
    with warnings.catch_warnings():  # metrics_interval_s is marked deprecated, yet it is what handles report by
        warnings.simplefilter("ignore", DeprecationWarning)
        engine = serve.deployment(EngineReplica, name=ENGINE_DEPLOYMENT).options(
            autoscaling_config=opts.autoscaling_config(), max_ongoing_requests=opts.max_ongoing_requests,
            ray_actor_options={"num_cpus": opts.replica_cpus}, graceful_shutdown_timeout_s=30.0, **routing)
    ingress = serve.deployment(Ingress, name=INGRESS_DEPLOYMENT).options(
        num_replicas=opts.ingress_replicas, ray_actor_options={"num_cpus": 0},
        # it only relays: the limit on work is the engines' max_ongoing_requests
        max_ongoing_requests=max(1024, 4 * opts.max_replicas * opts.max_ongoing_requests))
    return ingress.bind(engine.bind(model, engine_kwargs, server_config))


def serve_on_ray(model: str, engine_kwargs: dict[str, Any], server_config: ServerConfig,
                 opts: RayServeOptions, stop: threading.Event | None = None) -> int:
    """Deploy on the Ray cluster (`opts.address`, else $RAY_ADDRESS, else the local cluster `ray start
    --head` started, else a new instance in this process) and serve until SIGINT/SIGTERM (or `stop`);
    then delete the application. With `--ray-detach` it returns once the application is running."""
    import ray

    app = build_app(model, engine_kwargs, server_config, opts)
    # Detached, the application must outlive this process: only an existing cluster can hold it.
    ray.init(address=opts.address or ("auto" if opts.detach else None), ignore_reinit_error=True)
    stop = stop or threading.Event()
    # Installed before deploying: a signal that comes while replicas start ends the run once they are up.
    previous = {} if opts.detach else {sig: signal.signal(sig, lambda *_: stop.set())
                                       for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        serve.start(http_options={"host": opts.host, "port": opts.port})
        serve.run(app, name=opts.app_name, route_prefix="/")
        logger.info("pagedserve on Ray Serve: http://%s:%d/v1 (application %r)", opts.host, opts.port,
                    opts.app_name)
        if opts.detach:
            return 0
        while not stop.wait(1.0):
            pass
        serve.delete(opts.app_name)  # each replica finishes its requests first
        return 0
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if not opts.detach:
            ray.shutdown()


def main(argv: list[str] | None = None) -> int:
    """`python -m pagedserve.serving.ray_app [serve options]`: the same as `pagedserve serve --ray`."""
    from pagedserve.entrypoints.cli import main as cli_main

    return cli_main(["serve", "--ray", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
