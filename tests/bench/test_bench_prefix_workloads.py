"""The prefix-sharing workloads (`prefix`, `chat`): shared token ids, history extension, timing, files;
and the prefix-cache hit-rate summary from each source."""

from __future__ import annotations

import pytest

from pagedserve.bench import prefix_cache
from pagedserve.bench.records import RequestRecord, RunResult
from pagedserve.bench.runners.openai_client import parse_prefix_counters
from pagedserve.bench.shared_prefix import (
    CHAT_SYSTEM,
    chat_workload,
    make_conversations,
    prefix_workload,
    turn_prompt,
)
from pagedserve.bench.text_source import count_tokens, reference_lines, take_tokens
from pagedserve.bench.workloads import chapter_workload, load_jsonl, load_workload, save_jsonl


def _dump(wl) -> list[dict]:
    return [r.to_json() for r in wl.requests]


def test_reference_text_is_real_and_stripped():
    source, lines = reference_lines()
    assert len(lines) >= 200 and source
    assert all(line == line.strip() and line for line in lines[:500])
    text = take_tokens(lines, 3, 50)
    assert count_tokens(text) <= 50 and text.startswith(lines[3])


def test_prefix_requests_share_identical_token_ids(smollm2_tokenizer):
    tok = smollm2_tokenizer
    wl = prefix_workload(8, prefix_tokens=300, seed=3, rate=4.0, tokenizer=tok)
    n_chars = wl.meta["prefix_chars"]
    prefix = wl.requests[0].prompt[:n_chars]
    assert prefix.endswith("\n") and all(r.prompt.startswith(prefix) for r in wl.requests)
    prefix_ids = tok.encode(prefix)
    assert 280 <= len(prefix_ids) <= 300 and wl.meta["prefix_token_count"] == len(prefix_ids)
    for r in wl.requests:
        assert tok.encode(r.prompt)[:len(prefix_ids)] == prefix_ids  # no merge across the boundary
    questions = [r.prompt[n_chars:] for r in wl.requests]
    assert len(set(questions)) == len(questions) and all(len(tok.encode(q)) < 40 for q in questions)
    offsets = [r.arrival_offset for r in wl.requests]
    assert offsets == sorted(offsets) and offsets[-1] > 0 and wl.arrival.startswith("Poisson")
    assert _dump(wl) == _dump(prefix_workload(8, prefix_tokens=300, seed=3, rate=4.0, tokenizer=tok))


def test_prefix_without_a_tokenizer_estimates_and_refuses_too_short():
    wl = load_workload("prefix", 3, prefix_tokens=200, max_tokens_cap=5)
    assert len(wl.requests) == 3 and all(r.max_tokens <= 5 for r in wl.requests)
    assert wl.meta["prefix_token_count"] <= 200 and "estimated" in wl.meta["token_counts"]
    assert len(load_workload("prefix").requests) == 32  # the default size
    with pytest.raises(ValueError, match="prefix_tokens"):
        prefix_workload(2, prefix_tokens=3)


def test_chat_turn_extends_the_previous_prompt_and_reply(smollm2_tokenizer):
    tok = smollm2_tokenizer
    convs = make_conversations(3, 4, seed=5, think_time=2.0, tokenizer=tok)
    wl = chat_workload(conversations=3, turns=4, think_time=2.0, seed=5, tokenizer=tok)
    assert len(wl.requests) == 12 and wl.describe()["conversations"] == 3
    by_conv: dict[str, list] = {}
    for r in wl.requests:
        by_conv.setdefault(r.conversation, []).append(r)
    for conv, reqs in zip(convs, by_conv.values(), strict=True):
        assert [r.turn for r in reqs] == [0, 1, 2, 3]
        assert reqs[0].prompt == turn_prompt(conv, 0) and reqs[0].prompt.startswith(CHAT_SYSTEM)
        for t in range(1, 4):
            prev, cur = reqs[t - 1], reqs[t]
            assert cur.prompt == f"{prev.prompt} {conv.replies[t - 1]}\nUser: {conv.user[t]}\nAssistant:"
            prev_ids = tok.encode(prev.prompt)
            assert tok.encode(cur.prompt)[:len(prev_ids)] == prev_ids
            assert cur.arrival_offset > prev.arrival_offset  # turns arrive in order, a think time apart
        assert [r.max_tokens for r in reqs] == [count_tokens(a, tok) for a in conv.replies]
        assert len(set(conv.user[1:])) == 3  # no follow-up asked twice in a conversation
    assert _dump(wl) == _dump(chat_workload(conversations=3, turns=4, think_time=2.0, seed=5, tokenizer=tok))


def test_chat_retiming_moves_whole_conversations(tmp_path):
    wl = chat_workload(conversations=4, turns=3, think_time=1.0, seed=1, max_tokens_cap=4)
    timed = wl.with_arrivals(rate=0.5, seed=2)
    for before, after in zip(wl.requests, timed.requests, strict=True):
        first_b = next(r for r in wl.requests if r.conversation == before.conversation).arrival_offset
        first_a = next(r for r in timed.requests if r.conversation == after.conversation).arrival_offset
        assert after.arrival_offset - first_a == pytest.approx(before.arrival_offset - first_b)  # gaps kept
    starts = sorted({r.arrival_offset for r in timed.requests if r.turn == 0})
    assert len(starts) == 4 and starts[0] == 0.0
    with pytest.raises(ValueError, match="think times"):
        wl.with_arrivals(concurrency=2)
    assert len(load_workload("chat", num_requests=5, turns=3).requests) == 5  # whole conversations first
    back = load_jsonl(save_jsonl(timed, tmp_path / "chat.jsonl"))
    assert _dump(back) == _dump(timed) and back.fingerprint() == timed.fingerprint()
    # Single-turn workloads write no conversation fields, so their files and fingerprints are unchanged.
    assert "conversation" not in chapter_workload(2).requests[0].to_json()


def _run(kind: str, requests: list[RequestRecord], counters: dict | None = None, enabled: bool | None = None):
    config = {} if enabled is None else {"engine": {"cache": {"enable_prefix_caching": enabled}}}
    return RunResult("s", kind, config, requests, prefix_cache=counters)


def test_hit_rate_sources():
    reqs = [RequestRecord("a", 0.0, 2, prompt_tokens=100, cached_tokens=0),
            RequestRecord("b", 0.0, 2, prompt_tokens=100, cached_tokens=80)]
    engine = prefix_cache.summary(_run("engine", reqs, {"queries": 200, "hits": 64, "source": "engine counters"}, True))
    assert engine["hit_rate"] == pytest.approx(0.32) and engine["source"] == "engine counters"
    no_counters = prefix_cache.summary(_run("engine", reqs, {"queries": 0, "hits": 0}, True))
    assert no_counters["hit_rate"] == pytest.approx(0.4) and no_counters["source"] == "per-request cached tokens"
    http = prefix_cache.summary(_run("openai", reqs, {"queries": 1000, "hits": 10, "source": "server /metrics"}))
    assert http["hit_rate"] == pytest.approx(0.4)  # over HTTP the responses' own counts come first
    plain = [RequestRecord("a", 0.0, 2, prompt_tokens=100)]
    assert prefix_cache.summary(_run("engine", plain, {"queries": 0, "hits": 0}, False))["hit_rate"] == 0.0
    assert prefix_cache.summary(_run("hf", plain))["hit_rate"] is None


def test_parse_prefix_counters():
    text = ("# HELP vllm:prefix_cache_queries_total tokens\n"
            'vllm:prefix_cache_queries_total{model_name="m"} 120.0\n'
            "vllm:prefix_cache_hits_total 30\n"
            "vllm:prefix_cache_hits_total_created 1.7e9\n")
    assert parse_prefix_counters(text) == {"queries": 120.0, "hits": 30.0}
    assert parse_prefix_counters("other_metric 1\n") == {}


def test_http_run_reads_cached_tokens_and_metrics():
    """Over HTTP: usage.prompt_tokens_details.cached_tokens per response, and /metrics counters around the run."""
    import json

    import httpx

    from pagedserve.bench.metrics import summarize
    from pagedserve.bench.runners.openai_client import run_openai

    scrapes = iter([120.0, 220.0])

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/v1/models":
            return httpx.Response(200, json={"data": [{"id": "m"}]})
        if request.url.path == "/metrics":
            q = next(scrapes)
            return httpx.Response(200, text=f"vllm:prefix_cache_queries_total {q}\nvllm:prefix_cache_hits_total {q / 2}\n")
        body = json.loads(request.content)
        usage = {"prompt_tokens": 50, "completion_tokens": body["max_tokens"],
                 "prompt_tokens_details": {"cached_tokens": 40 if body["prompt"].endswith("1") else 0}}
        events = [{"choices": [{"index": 0, "text": f" t{i}", "finish_reason": None}]} for i in range(body["max_tokens"])]
        events.append({"choices": [], "usage": usage})
        sse = "".join(f"data: {json.dumps(e)}\n\n" for e in events) + "data: [DONE]\n\n"
        return httpx.Response(200, headers={"content-type": "text/event-stream"}, content=sse.encode())

    wl = prefix_workload(2, prefix_tokens=60, max_tokens_cap=2)
    wl.requests[1].prompt += " 1"
    run = run_openai(wl, "http://127.0.0.1:9", system="fake", progress=False, transport=httpx.MockTransport(handler))
    assert [r.cached_tokens for r in run.requests] == [0, 40]
    assert run.prefix_cache == {"queries": 100, "hits": 50, "source": "server /metrics"}
    pc = summarize(run)["prefix_cache"]
    assert pc["hit_rate"] == pytest.approx(0.4) and pc["source"] == "per-request cached tokens"
