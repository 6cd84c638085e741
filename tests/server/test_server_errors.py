"""Bad input: every case is a 400 with an OpenAI error body naming the field, and none reaches the engine."""

from __future__ import annotations

import re

import pytest

from tests.server.test_server_support import launch_server

MSG = [{"role": "user", "content": "hi"}]
LONG = "hello " * 600  # > 512 tokens, the tiny model's context
HUGE = "word " * 4000  # long enough to be tokenized off the event loop

# (endpoint, body, param named in the error)
CASES = [
    ("completions", {"prompt": "hi", "max_tokens": "ten"}, "max_tokens"),
    ("completions", {"prompt": "hi", "temperature": "hot"}, "temperature"),
    ("completions", {"prompt": "hi", "stream": "yes"}, "stream"),
    ("completions", {"prompt": "hi", "n": 1.5}, "n"),
    ("completions", {"prompt": "hi", "logprobs": True}, "logprobs"),
    ("completions", {"prompt": "hi", "stop": 5}, "stop"),
    ("completions", {"prompt": 5}, "prompt"),
    ("completions", {"prompt": [1, "a"]}, "prompt"),
    ("completions", {}, "prompt"),
    ("completions", {"prompt": ""}, "prompt"),
    ("completions", {"prompt": []}, "prompt"),
    ("completions", {"prompt": [10**9]}, "prompt"),
    ("completions", {"prompt": "hi", "temperature": -1}, "temperature"),
    ("completions", {"prompt": "hi", "temperature": 101}, "temperature"),
    ("completions", {"prompt": "hi", "top_p": 0}, "top_p"),
    ("completions", {"prompt": "hi", "top_p": 1.5}, "top_p"),
    ("completions", {"prompt": "hi", "n": 0}, "n"),
    ("completions", {"prompt": "hi", "n": 1000}, "n"),
    ("completions", {"prompt": "hi", "max_tokens": 0}, "max_tokens"),
    ("completions", {"prompt": "hi", "presence_penalty": 3}, "presence_penalty"),
    ("completions", {"prompt": "hi", "frequency_penalty": -3}, "frequency_penalty"),
    ("completions", {"prompt": "hi", "top_k": 0}, "top_k"),
    ("completions", {"prompt": "hi", "min_p": 2}, "min_p"),
    ("completions", {"prompt": "hi", "repetition_penalty": 0}, "repetition_penalty"),
    ("completions", {"prompt": "hi", "logprobs": 21}, "logprobs"),
    ("completions", {"prompt": "hi", "min_tokens": 10, "max_tokens": 5}, "min_tokens"),
    ("completions", {"prompt": "hi", "seed": 2**70}, "seed"),
    ("completions", {"prompt": "hi", "stop_token_ids": [-1]}, "stop_token_ids"),
    ("completions", {"prompt": "hi", "model": "gpt-4"}, "model"),
    ("completions", {"prompt": LONG}, "prompt"),
    ("completions", {"prompt": HUGE}, "prompt"),
    ("completions", {"prompt": "hi", "max_tokens": 100000}, "max_tokens"),
    ("completions", {"prompt": "hi", "stream_options": {"include_usage": True}}, "stream_options"),
    ("completions", {"prompt": "hi", "echo": True, "logprobs": 1, "stream": True}, "echo"),
    ("completions", {"prompt": "hi", "max_tokens": 0}, "max_tokens"),
    ("completions", {"prompt": "hi", "prompt_logprobs": 21}, "prompt_logprobs"),
    ("completions", {"prompt": "hi", "cache_salt": ""}, "cache_salt"),
    ("completions", {"prompt": "hi", "n": 64, "max_tokens": 500}, "n"),
    ("completions", {"prompt": "hi", "logit_bias": {"1": 101}}, "logit_bias"),
    ("completions", {"prompt": "hi", "logit_bias": {"one": 5}}, "logit_bias"),
    ("completions", {"prompt": "hi", "logit_bias": {"99999999": 5}}, "logit_bias"),
    ("chat/completions", {"messages": MSG, "logit_bias": {"-3": 5}}, "logit_bias"),
    ("chat/completions", {"messages": []}, "messages"),
    ("chat/completions", {}, "messages"),
    ("chat/completions", {"messages": "hi"}, "messages"),
    ("chat/completions", {"messages": [{"role": "bot", "content": "x"}]}, "messages[0].role"),
    ("chat/completions", {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
     "messages[0].content"),
    ("chat/completions", {"messages": [{"role": "user", "content": LONG}]}, "messages"),
    ("chat/completions", {"messages": [{"role": "user", "content": HUGE}]}, "messages"),
    ("chat/completions", {"messages": MSG, "model": "other"}, "model"),
    ("chat/completions", {"messages": MSG, "n": 65}, "n"),
    ("chat/completions", {"messages": MSG, "logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ("chat/completions", {"messages": MSG, "top_logprobs": 2}, "top_logprobs"),
    ("chat/completions", {"messages": MSG, "max_completion_tokens": -1}, "max_completion_tokens"),
    ("chat/completions", {"messages": MSG, "max_completion_tokens": 100000}, "max_completion_tokens"),
    ("chat/completions", {"messages": MSG, "temperature": None, "top_p": "x"}, "top_p"),
    # this server runs --scheduling-policy fcfs: a priority is refused, not silently ignored
    ("completions", {"prompt": "hi", "priority": 1}, "priority"),
    ("completions", {"prompt": "hi", "priority": "high"}, "priority"),
    ("completions", {"prompt": "hi", "n": 2, "use_beam_search": True, "priority": -1}, "priority"),
    ("chat/completions", {"messages": MSG, "priority": 3}, "priority"),
]


@pytest.fixture(scope="module")
def server(tiny_llama_dir):
    with launch_server(str(tiny_llama_dir), "--num-blocks", "512", "--num-threads", "1") as s:
        yield s


def _finished(server) -> float:
    return sum(v for (name, _), v in server.metrics().items() if name == "vllm:request_success_total")


def _check_error(r, status: int, param: str | None) -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert isinstance(err["message"], str) and err["message"]
    assert err["param"] == param
    if param:  # the message names the field too: "messages[0].role" → "role"
        assert [p for p in re.split(r"[.\[\]]", param) if p and not p.isdigit()][-1] in err["message"]
    return err


@pytest.mark.parametrize("endpoint,body,param", CASES,
                         ids=[f"{e.split('/')[0]}-{p}-{i}" for i, (e, _, p) in enumerate(CASES)])
def test_bad_request_names_the_field(server, endpoint, body, param):
    r = server.post(f"/v1/{endpoint}", json=body)
    err = _check_error(r, 400, param)
    assert err["type"] == "invalid_request_error"
    good = {"prompt": "hi"} if endpoint == "completions" else {"messages": MSG}
    assert server.post(f"/v1/{endpoint}", json={**good, "max_tokens": 1}).status_code == 200


def test_bad_requests_never_reach_the_engine_and_the_next_good_one_works(server):
    before = _finished(server), server.metric("vllm:prompt_tokens_total")
    for endpoint, body, _ in CASES:
        assert server.post(f"/v1/{endpoint}", json=body).status_code == 400
    # not one of them was admitted: no request finished, no prompt token was processed
    assert (_finished(server), server.metric("vllm:prompt_tokens_total")) == before
    good = server.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2})
    assert good.status_code == 200 and good.json()["choices"][0]["text"] is not None
    good = server.post("/v1/chat/completions", json={"messages": MSG, "max_tokens": 2})
    assert good.status_code == 200


@pytest.mark.parametrize("content", [b'{"prompt": "hi",', b"", b"[1, 2]", b"null", b"\xff\xfe"])
def test_not_json_or_not_an_object(server, content):
    r = server.post("/v1/completions", content=content, headers={"Content-Type": "application/json"})
    _check_error(r, 400, None)
    assert server.post("/v1/completions", json={"prompt": "hi", "max_tokens": 1}).status_code == 200


def test_json_without_content_type(server):
    """`curl -d` sends form encoding; the body is still read as JSON."""
    r = server.post("/v1/completions", content=b'{"prompt": "hi", "max_tokens": 1}',
                    headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert r.status_code == 200


def test_body_too_large(server):
    big = {"prompt": "x" * (2 << 20)}
    r = server.post("/v1/completions", json=big)
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"

    def chunks():  # no Content-Length: the limit holds while reading
        for _ in range(40):
            yield b"x" * 65536

    r = server.post("/v1/completions", content=chunks())
    assert r.status_code == 413
    assert server.post("/v1/completions", json={"prompt": "hi", "max_tokens": 1}).status_code == 200


def test_unknown_route_and_method(server):
    with server.http() as http:
        _check_error(http.get("/v1/nothing"), 404, None)
        _check_error(http.get("/v1/completions"), 405, None)


def test_tokenize_errors(server):
    _check_error(server.post("/detokenize", json={"tokens": [-1]}), 400, "tokens")
    _check_error(server.post("/detokenize", json={"tokens": "abc"}), 400, "tokens")
    _check_error(server.post("/tokenize", json={}), 400, "prompt")
    _check_error(server.post("/tokenize", json={"prompt": "a", "model": "x"}), 400, "model")
