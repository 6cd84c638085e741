"""`--scheduling-policy priority`: the `priority` field (vLLM's extension) orders the server's queue;
it never changes what a request generates. (Under fcfs a priority is a 400: test_server_errors.py.)"""

from __future__ import annotations

import asyncio

import httpx
import pytest

from tests.server.test_server_support import launch_server

MSG = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def server(tiny_llama_dir):
    """One seat: whoever holds it is who the policy picked."""
    with launch_server(str(tiny_llama_dir), "--num-blocks", "512", "--num-threads", "1", "--max-num-seqs", "1",
                       "--scheduling-policy", "priority") as s:
        yield s


def test_priority_field_is_accepted_and_greedy_text_does_not_depend_on_it(server):
    greedy = {"prompt": "Hello world", "max_tokens": 8, "temperature": 0, "ignore_eos": True}
    texts = set()
    for priority in (0, -3, 7):
        r = server.post("/v1/completions", json={**greedy, "priority": priority})
        assert r.status_code == 200, r.text
        texts.add(r.json()["choices"][0]["text"])
    assert len(texts) == 1
    r = server.post("/v1/chat/completions", json={"messages": MSG, "max_tokens": 3, "priority": 2})
    assert r.status_code == 200, r.text
    r = server.post("/v1/completions", json={**greedy, "n": 2, "priority": 1})
    assert r.status_code == 200 and len(r.json()["choices"]) == 2
    r = server.post("/v1/completions", json={**greedy, "n": 2, "use_beam_search": True, "priority": -1})
    assert r.status_code == 200, r.text
    r = server.post("/v1/completions", json={**greedy, "priority": "high"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "priority"


async def _overtaking(server) -> list[str]:
    """A long stream holds the one seat; three bulk requests (priority 5) queue behind it, then an
    urgent one (priority 0) arrives. Returns the order the four finished in."""
    done: list[str] = []
    async with httpx.AsyncClient(base_url=server.base_url, headers=server.headers, timeout=120) as client:
        async def complete(name: str, priority: int, max_tokens: int) -> None:
            r = await client.post("/v1/completions", json={"prompt": f"{name}:", "max_tokens": max_tokens,
                                                           "ignore_eos": True, "priority": priority})
            assert r.status_code == 200, r.text
            done.append(name)

        async def stream(started: asyncio.Event) -> None:
            body = {"prompt": "Story:", "max_tokens": 400, "ignore_eos": True, "stream": True, "priority": 5}
            async with client.stream("POST", "/v1/completions", json=body) as r:
                assert r.status_code == 200
                async for line in r.aiter_lines():
                    if line.startswith("data: "):
                        started.set()

        started = asyncio.Event()
        streaming = asyncio.create_task(stream(started))
        await started.wait()
        bulk = [asyncio.create_task(complete(f"bulk{i}", 5, 40)) for i in range(3)]
        await asyncio.sleep(0.2)  # they are queued before the urgent one arrives
        await complete("urgent", 0, 4)
        await asyncio.gather(streaming, *bulk)
    return done


def test_a_better_priority_overtakes_running_and_queued_requests(server):
    before = server.metric("vllm:num_preemptions_total")
    done = asyncio.run(_overtaking(server))
    assert done[0] == "urgent" and sorted(done[1:]) == ["bulk0", "bulk1", "bulk2"]
    # It took the seat from whoever held it (the stream, priority 5), which resumed afterwards.
    assert server.metric("vllm:num_preemptions_total") > before
    m = server.wait_idle()
    assert m[("pagedserve:kv_blocks_free", ())] == m[("pagedserve:kv_blocks_total", ())]
