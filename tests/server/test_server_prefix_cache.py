"""Memory sharing over HTTP: cached_tokens in usage, the prefix-cache metrics, /reset_prefix_cache,
echo + logprobs in OpenAI's legacy shape (lm-eval's log-likelihood request) and /tokenizer_info."""

from __future__ import annotations

import math

import pytest

from tests.server.test_server_support import launch_server

LONG = "The quick brown fox jumps over the lazy dog near the river bank. " * 12


@pytest.fixture(scope="module")
def server(tiny_llama_dir):
    with launch_server(str(tiny_llama_dir), "--num-blocks", "256", "--block-size", "4", "--num-threads", "1") as s:
        yield s


def _complete(server, **body) -> dict:
    r = server.post("/v1/completions", json={"model": server.model, "temperature": 0, **body})
    assert r.status_code == 200, r.text
    return r.json()


def test_a_repeated_prompt_reports_cached_tokens_and_moves_the_metrics(server):
    server.wait_idle()
    assert server.post("/reset_prefix_cache").status_code == 200
    before = (server.metric("vllm:prefix_cache_queries_total"), server.metric("vllm:prefix_cache_hits_total"))
    cold = _complete(server, prompt=LONG, max_tokens=4)
    warm = _complete(server, prompt=LONG, max_tokens=4)
    prompt_tokens = cold["usage"]["prompt_tokens"]
    assert cold["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    cached = warm["usage"]["prompt_tokens_details"]["cached_tokens"]
    assert cached == (prompt_tokens - 1) // 4 * 4  # whole blocks, the last token computed again
    assert warm["choices"][0]["text"] == cold["choices"][0]["text"]
    m = server.wait_idle()
    queries = m[("vllm:prefix_cache_queries_total", ())] - before[0]
    hits = m[("vllm:prefix_cache_hits_total", ())] - before[1]
    assert (queries, hits) == (2 * prompt_tokens, cached)
    assert m[("pagedserve:kv_blocks_cached", ())] > 0


def test_reset_prefix_cache_empties_it(server):
    _complete(server, prompt=LONG, max_tokens=2)
    server.wait_idle()
    r = server.post("/reset_prefix_cache")
    assert r.status_code == 200 and r.json() == {"reset": True}
    after = _complete(server, prompt=LONG, max_tokens=2)
    assert after["usage"]["prompt_tokens_details"]["cached_tokens"] == 0


def test_cache_salt_separates_tenants(server):
    a = _complete(server, prompt=LONG + " salted", max_tokens=2, cache_salt="tenant-a")
    b = _complete(server, prompt=LONG + " salted", max_tokens=2, cache_salt="tenant-b")
    a2 = _complete(server, prompt=LONG + " salted", max_tokens=2, cache_salt="tenant-a")
    assert a["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    assert b["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    assert a2["usage"]["prompt_tokens_details"]["cached_tokens"] > 0


@pytest.mark.parametrize("max_tokens", [0, 1])
def test_echo_with_logprobs_scores_the_prompt_as_lm_eval_asks(server, max_tokens):
    prompt = "The capital of France is Paris"
    r = _complete(server, prompt=prompt, max_tokens=max_tokens, echo=True, logprobs=1)
    choice = r["choices"][0]
    lp = choice["logprobs"]
    n_prompt = r["usage"]["prompt_tokens"]
    assert len(lp["tokens"]) == n_prompt + max_tokens == len(lp["token_logprobs"]) == len(lp["top_logprobs"])
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    assert all(x <= 0 and math.isfinite(x) for x in lp["token_logprobs"][1:])
    assert all(len(t) >= 1 for t in lp["top_logprobs"][1:])  # the top-1, plus the prompt token if it differs
    assert lp["text_offset"][0] == 0 and lp["text_offset"] == sorted(lp["text_offset"])
    assert choice["text"].startswith(prompt) and r["usage"]["completion_tokens"] == max_tokens
    # the same prompt scored again (its blocks now cached) gets the same numbers: scoring skips the cache
    again = _complete(server, prompt=prompt, max_tokens=max_tokens, echo=True, logprobs=1)
    assert again["choices"][0]["logprobs"]["token_logprobs"] == lp["token_logprobs"]


def test_prompt_logprobs_field_on_chat(server):
    r = server.post("/v1/chat/completions", json={"model": server.model, "max_tokens": 1, "prompt_logprobs": 2,
                                                  "messages": [{"role": "user", "content": "hi there"}]})
    assert r.status_code == 200, r.text
    plp = r.json()["prompt_logprobs"]
    assert plp[0] is None and len(plp) == r.json()["usage"]["prompt_tokens"]
    assert all(2 <= len(d) <= 3 for d in plp[1:])


def test_tokenizer_info(server):
    with server.http() as c:
        info = c.get("/tokenizer_info").json()
    assert info["vocab_size"] > 0 and info["eos_token"] and "chat_template" in info
    assert info["model_max_length"] > 0


def test_use_beam_search_on_both_endpoints(server, tiny_llama_dir):
    from pagedserve import LLM, BeamSearchParams

    r = _complete(server, prompt="Hello world", max_tokens=8, n=3, use_beam_search=True, ignore_eos=True)
    texts = [c["text"] for c in sorted(r["choices"], key=lambda c: c["index"])]
    offline = LLM(str(tiny_llama_dir), num_blocks=64, block_size=4).beam_search(
        "Hello world", BeamSearchParams(beam_width=3, max_tokens=8, ignore_eos=True))[0]
    assert texts == [s.text for s in offline.sequences]
    chat = server.post("/v1/chat/completions", json={"model": server.model, "max_tokens": 6, "n": 2,
                                                     "use_beam_search": True,
                                                     "messages": [{"role": "user", "content": "hi"}]})
    assert chat.status_code == 200, chat.text
    assert len(chat.json()["choices"]) == 2
    server.wait_idle()


@pytest.mark.parametrize(("extra", "param"), [({"top_p": 0.5}, "top_p"), ({"seed": 1}, "seed"),
                                               ({"stream": True}, "stream"), ({"n": 0}, "n"),
                                               ({"logprobs": 2}, "logprobs")])
def test_beam_search_refuses_sampling_fields(server, extra, param):
    r = server.post("/v1/completions", json={"model": server.model, "prompt": "hi", "max_tokens": 4,
                                             "use_beam_search": True, "n": 2, **extra})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param
