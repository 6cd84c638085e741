"""pagedserve on Ray Serve (pagedserve/serving/ray_app.py, ray_router.py), end to end: a local Ray
instance started in this process, the application behind Ray Serve's HTTP proxy on 127.0.0.1, the tiny
random-weight model, one torch thread per engine replica. Ray and every process it started are gone at
the end, whatever happened."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator

import httpx
import openai
import psutil
import pytest
import ray
from fastapi import FastAPI, Request
from fastapi.responses import StreamingResponse
from ray import serve

from pagedserve.entrypoints.openai.serving_base import ServerConfig
from pagedserve.serving.ray_app import ENGINE_DEPLOYMENT, REPLICA_HEADER, ResponseStart, build_app, relay_asgi
from pagedserve.serving.ray_options import RayServeOptions
from pagedserve.serving.ray_router import HTTPForward
from tests.server.test_server_support import REPO, free_port

MODEL = "tiny"
# Small blocks so that short prompts fill several; one torch thread per replica (2 cores, several replicas).
ENGINE = {"num_blocks": 256, "block_size": 4, "num_threads": 1, "max_num_seqs": 4}


# --- without Ray: the in-process relay ---------------------------------------------------------------

def test_relay_streams_and_a_closed_relay_is_a_disconnect():
    app = FastAPI()
    seen: list[str] = []

    @app.post("/stream")
    async def stream(request: Request) -> StreamingResponse:
        body = await request.body()

        async def chunks():
            try:
                for i in range(1000):
                    yield f"{body.decode()}{i};"
                    await asyncio.sleep(0.01)
            finally:
                seen.append("closed")
        return StreamingResponse(chunks(), media_type="text/plain")

    async def main() -> tuple[list, list]:
        fwd = HTTPForward("POST", "/stream", b"", [(b"content-type", b"text/plain")], b"x")
        relay = relay_asgi(app, fwd, [(b"x-extra", b"1")])
        items = [await anext(relay) for _ in range(4)]
        await relay.aclose()  # the client left after three chunks
        return items, seen

    items, seen_after = asyncio.run(main())
    start, *chunks = items
    assert isinstance(start, ResponseStart) and start.status == 200
    assert (b"x-extra", b"1") in start.headers and (b"content-type", b"text/plain; charset=utf-8") in start.headers
    assert chunks == [b"x0;", b"x1;", b"x2;"]  # as they were sent, not once the response was complete
    assert seen_after == ["closed"]  # the app saw the disconnect and stopped streaming


def test_the_engine_and_plain_server_do_not_import_ray():
    code = ("import sys; import pagedserve.entrypoints.cli as c; import pagedserve.entrypoints.openai.api_server; "
            "import pagedserve.serving.app; c.build_parser(); assert 'ray' not in sys.modules, 'ray imported'")
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True, timeout=120)


# --- on a local Ray instance ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def serve_url() -> Iterator[str]:
    env = pytest.MonkeyPatch()
    env.setenv("RAY_USAGE_STATS_ENABLED", "0")
    # Loopback only, and no token written to ~/.ray for a cluster that lives as long as this module.
    env.setenv("RAY_AUTH_MODE", "disabled")
    # A replica that answers Ray's queue-length probe late (0.1 s by default) is passed over for the next
    # rank: on 2 busy cores that would be a misroute, not what the routing test is about. Workers inherit it.
    env.setenv("RAY_SERVE_QUEUE_LENGTH_RESPONSE_DEADLINE_S", "1.0")
    # Ray's unix sockets live under its temp dir and must stay short; a dir of our own leaves /tmp/ray alone.
    temp_dir = tempfile.mkdtemp(prefix="psray-", dir="/tmp")
    port = free_port()
    me = psutil.Process()
    try:
        ray.init(address="local", num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1",
                 _temp_dir=temp_dir, log_to_driver=False)
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        yield f"http://127.0.0.1:{port}"
    finally:
        started = set(me.children(recursive=True))  # Ray's daemons and workers, before they go
        with contextlib.suppress(Exception):
            serve.shutdown()
        ray.shutdown()
        _, alive = psutil.wait_procs(list(started), timeout=20)
        for p in alive:
            with contextlib.suppress(psutil.Error):
                p.kill()
        shutil.rmtree(temp_dir, ignore_errors=True)
        env.undo()
        assert not alive, f"processes left after ray.shutdown(): {[p.pid for p in alive]}"


@contextlib.contextmanager
def deployed(model_dir, name: str, opts: RayServeOptions) -> Iterator[None]:
    app = build_app(str(model_dir), ENGINE, ServerConfig(served_model_name=MODEL), opts)
    serve.run(app, name=name, route_prefix="/")  # returns once every replica is running
    try:
        yield
    finally:
        serve.delete(name)


def wait_until(predicate, timeout: float, what: str, every: float = 0.25) -> None:
    """Polls gently: each serve.status() is a call to Ray Serve's controller, on the same 2 cores."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} not reached after {timeout}s; status: {serve.status()}")
        time.sleep(every)


def running_replicas(name: str) -> int:
    deployment = serve.status().applications[name].deployments[ENGINE_DEPLOYMENT]
    return deployment.replica_states.get("RUNNING", 0)


def replica_of(r: httpx.Response) -> str:
    assert r.status_code == 200, r.text
    return r.headers[REPLICA_HEADER]


@pytest.mark.slow
def test_openai_routes_and_cache_aware_routing(serve_url, tiny_llama_dir):
    opts = RayServeOptions(policy="cache_aware", min_replicas=2, max_replicas=2, replica_cpus=0.5,
                           metrics_interval_s=0.5, look_back_period_s=2.0, routing_stats_period_s=0.5)
    with deployed(tiny_llama_dir, "ps-routes", opts), httpx.Client(base_url=serve_url, timeout=60) as http:
        # Requests without a prompt go least-loaded, in turn: both replicas are in the router's view.
        seen = set()
        wait_until(lambda: seen.add(replica_of(http.get("/health"))) or len(seen) == 2, timeout=30,
                   what="both engine replicas answering")

        # cache_aware: each tenant's long shared prefix stays on one replica, the two tenants apart
        # (the second tenant matches nothing, so it goes to the smaller tree).
        tenant_a = "You are the billing assistant of Acme Corp. " * 8
        tenant_b = "Tu es le guide touristique de la ville de Lyon. " * 8
        where: dict[str, set[str]] = {"a": set(), "b": set()}
        for i in range(4):
            r = http.post("/v1/completions", json={"model": MODEL, "prompt": f"{tenant_a}Question {i}:",
                                                   "max_tokens": 4})
            where["a"].add(replica_of(r))
            r = http.post("/v1/chat/completions", json={"model": MODEL, "max_tokens": 4, "messages": [
                {"role": "system", "content": tenant_b}, {"role": "user", "content": f"Question {i}?"}]})
            where["b"].add(replica_of(r))
        assert len(where["a"]) == 1 and len(where["b"]) == 1 and where["a"] != where["b"], where

        # The OpenAI routes through Ray Serve's HTTP proxy, with the openai client.
        client = openai.OpenAI(base_url=f"{serve_url}/v1", api_key="unused", max_retries=0, timeout=60)
        assert [m.id for m in client.models.list().data] == [MODEL]
        done = client.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=6,
                                         temperature=0, extra_body={"ignore_eos": True})
        assert done.usage.completion_tokens == 6 and done.choices[0].finish_reason == "length"
        chunks = list(client.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=6,
                                                temperature=0, stream=True, extra_body={"ignore_eos": True}))
        assert len(chunks) > 1  # events as tokens come (a token whose text is not complete yet waits for the next)
        assert "".join(c.choices[0].text for c in chunks if c.choices) == done.choices[0].text

        messages = [{"role": "user", "content": "Say hello."}]
        chat = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=5, temperature=0,
                                              extra_body={"ignore_eos": True})
        assert chat.usage.completion_tokens == 5 and chat.choices[0].message.role == "assistant"
        stream = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=5, temperature=0,
                                                stream=True, extra_body={"ignore_eos": True})
        deltas = [c.choices[0].delta.content or "" for c in stream if c.choices]
        assert "".join(deltas) == chat.choices[0].message.content

        # The engine app's own validation answers through the relay: OpenAI's 400 naming the field.
        with pytest.raises(openai.BadRequestError) as err:
            client.completions.create(model=MODEL, prompt="x", max_tokens=6, temperature=-1)
        assert err.value.status_code == 400 and "temperature" in str(err.value)
        r = http.get("/health")
        assert r.status_code == 200


@pytest.mark.slow
def test_autoscales_one_to_two_and_back_answering_every_request(serve_url, tiny_llama_dir):
    name = "ps-autoscale"
    opts = RayServeOptions(policy="least_loaded", min_replicas=1, max_replicas=2, target_ongoing=1.0,
                           upscale_delay_s=0.5, downscale_delay_s=3.0, metrics_interval_s=0.25,
                           look_back_period_s=1.0, max_ongoing_requests=2, replica_cpus=0.5,
                           routing_stats_period_s=0.5)
    with deployed(tiny_llama_dir, name, opts):
        assert running_replicas(name) == 1
        stop = threading.Event()
        results: list[tuple[int, int, str]] = []

        def client(i: int) -> None:
            with httpx.Client(base_url=serve_url, timeout=120) as c:
                while not stop.is_set():
                    r = c.post("/v1/completions", json={"model": MODEL, "prompt": f"Load {i}:", "max_tokens": 64,
                                                        "ignore_eos": True})
                    tokens = r.json()["usage"]["completion_tokens"] if r.is_success else 0
                    results.append((r.status_code, tokens, r.headers.get(REPLICA_HEADER, "")))

        # 6 clients against a target of 1 ongoing request per replica: Ray Serve adds the second replica,
        # and the requests queued in the router go to it.
        threads = [threading.Thread(target=client, args=(i,)) for i in range(6)]
        for t in threads:
            t.start()
        try:
            wait_until(lambda: running_replicas(name) == 2, timeout=90, what="a second replica running")
            wait_until(lambda: len({r[2] for r in results if r[2]}) == 2, timeout=60, what="the new replica answering")
        finally:
            stop.set()
            for t in threads:
                t.join(120)
        # Load gone: after the down delay Ray Serve stops one (its requests finish first).
        wait_until(lambda: running_replicas(name) == 1, timeout=60, what="back to one replica")
        assert len(results) >= 6 and all(r[:2] == (200, 64) for r in results), results
        r = httpx.post(f"{serve_url}/v1/completions", json={"model": MODEL, "prompt": "after", "max_tokens": 3},
                       timeout=60)
        assert r.status_code == 200
