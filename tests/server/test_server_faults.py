"""Faults inside the engine, with the app in-process (httpx over ASGI) so that a fault can be injected:
a failing step is a 500 for the requests of that step and the server goes on; a dead loop turns /health 503."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest

from pagedserve.config import EngineConfig
from pagedserve.engine.llm_engine import LLMEngine
from pagedserve.entrypoints.openai.api_server import build_app
from pagedserve.entrypoints.openai.serving_base import ServerConfig


@pytest.fixture
def engine(tiny_llama_dir) -> LLMEngine:
    return LLMEngine(EngineConfig.from_kwargs(str(tiny_llama_dir), num_blocks=256, block_size=4, max_num_seqs=4))


def serve(engine: LLMEngine, scenario) -> None:
    """Run `scenario(client, app)` against the app, with its lifespan (the engine loop) around it."""
    app = build_app(engine, ServerConfig(served_model_name="tiny"))

    async def main():
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://test", timeout=60) as client:
                await scenario(client, app)

    asyncio.run(asyncio.wait_for(main(), timeout=120))


def completion(max_tokens: int, **extra) -> dict:
    return {"prompt": "Hello there", "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True, **extra}


def _all_free(engine: LLMEngine) -> bool:
    s = engine.kv_stats()
    return s.free_blocks == s.total_blocks


def test_step_exception_is_500_for_that_step_and_serving_goes_on(engine, monkeypatch):
    real = engine.runner.execute
    armed = {"on": True}

    def flaky(sched):
        # fail the first step that carries both requests
        if armed["on"] and len(sched.scheduled) == 2:
            armed["on"] = False
            raise RuntimeError("injected fault")
        return real(sched)

    monkeypatch.setattr(engine.runner, "execute", flaky)

    async def scenario(client: httpx.AsyncClient, app):
        a, b = await asyncio.gather(client.post("/v1/completions", json=completion(50)),
                                    client.post("/v1/chat/completions",
                                                json={"messages": [{"role": "user", "content": "hi"}],
                                                      "max_tokens": 50, "ignore_eos": True}))
        for r in (a, b):
            assert r.status_code == 500, r.text
            err = r.json()["error"]
            assert err["type"] == "internal_server_error" and "injected fault" in err["message"]
        assert not armed["on"]
        ok = await client.post("/v1/completions", json=completion(5))
        assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 5
        assert (await client.get("/health")).status_code == 200
        assert await app.state.async_engine.call(_all_free)  # the failed requests' blocks were freed

    serve(engine, scenario)


def test_step_exception_mid_stream_is_an_error_event(engine, monkeypatch):
    real = engine.runner.execute
    calls = {"n": 0}

    def flaky(sched):
        calls["n"] += 1
        if calls["n"] == 5:  # after a few tokens have been streamed
            raise RuntimeError("injected fault")
        return real(sched)

    monkeypatch.setattr(engine.runner, "execute", flaky)

    async def scenario(client: httpx.AsyncClient, app):
        r = await client.post("/v1/completions", json=completion(50, stream=True))
        assert r.status_code == 200  # headers were out before the fault
        events = [line[len("data: "):] for line in r.text.splitlines() if line.startswith("data: ")]
        assert events[-1] == "[DONE]"
        assert "injected fault" in json.loads(events[-2])["error"]["message"]
        assert json.loads(events[0])["choices"][0]["text"] is not None
        ok = await client.post("/v1/completions", json=completion(3, stream=True))
        assert ok.status_code == 200 and ok.text.rstrip().endswith("data: [DONE]")

    serve(engine, scenario)


def test_dead_loop_turns_health_503(engine, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("broken beyond repair")

    async def scenario(client: httpx.AsyncClient, app):
        assert (await client.get("/health")).status_code == 200
        monkeypatch.setattr(engine.runner, "execute", broken)
        monkeypatch.setattr(engine, "abort_request", broken)  # recovery fails as well: the loop dies
        r = await client.post("/v1/completions", json=completion(5))
        assert r.status_code == 500 and r.json()["error"]["message"]
        health = await client.get("/health")
        assert health.status_code == 503 and health.json()["error"]["type"] == "service_unavailable"
        r = await client.post("/v1/completions", json=completion(5))
        assert r.status_code == 503  # nothing is admitted any more

    serve(engine, scenario)

