"""Every field of OpenAI's chat and completions requests, as the official SDK declares them: a supported
field has its effect checked, an unsupported one is a 400 naming it (its no-op values are accepted), an
unknown one is a 400. A field the SDK adds later fails `test_every_sdk_field_is_classified`."""

from __future__ import annotations

import inspect
import json

import openai
import pytest

from pagedserve.entrypoints.openai.unsupported import CHAT_UNSUPPORTED
from tests.server.test_server_support import launch_server, sse_events

MSG = [{"role": "user", "content": "Tell me a story about a dragon."}]
TOOL = {"type": "function", "function": {"name": "f", "parameters": {
    "type": "object", "properties": {"x": {"type": "integer", "minimum": 0, "maximum": 999}}, "required": ["x"], "additionalProperties": False}}}
SDK_ONLY = {"extra_headers", "extra_query", "extra_body", "timeout"}


def sdk_fields(create) -> set[str]:
    return set(inspect.signature(create).parameters) - {"self"} - SDK_ONLY


@pytest.fixture(scope="module")
def server(tiny_llama_dir):
    with launch_server(str(tiny_llama_dir), "--num-blocks", "512", "--num-threads", "1", "--log-level", "info") as s:
        yield s


def chat(server, **body) -> dict:
    r = server.post("/v1/chat/completions", json={"model": server.model, "messages": MSG, **body})
    assert r.status_code == 200, r.text
    return r.json()


def cmpl(server, **body) -> dict:
    r = server.post("/v1/completions", json={"model": server.model, "prompt": "Once upon a time", **body})
    assert r.status_code == 200, r.text
    return r.json()


def text(body: dict, i: int = 0) -> str:
    choice = body["choices"][i]
    return choice["message"]["content"] if "message" in choice else choice["text"]


GREEDY = dict(temperature=0, max_tokens=24, ignore_eos=True)


def _repeats_then_differs(server, call, field: str) -> None:
    base = call(server, **GREEDY)
    ids = server.post("/tokenize", json={"prompt": text(base), "add_special_tokens": False}).json()["tokens"]
    assert len(set(ids)) < len(ids)  # the tiny model repeats itself greedily: a penalty must change that
    assert text(call(server, **GREEDY, **{field: 2.0})) != text(base)


def _forced_token(server, call) -> None:
    body = call(server, logit_bias={"42": 100}, max_tokens=5, ignore_eos=True, temperature=1.0)
    assert text(body) == server.post("/detokenize", json={"tokens": [42] * 5}).json()["prompt"]


def _seeded(server, call) -> None:
    a, b, c = (text(call(server, temperature=1.0, seed=s, max_tokens=16, ignore_eos=True)) for s in (7, 7, 8))
    assert a == b != c


def _top_p(server, call) -> None:  # a tiny nucleus keeps only the most likely token: greedy
    assert text(call(server, temperature=1.0, top_p=1e-6, max_tokens=16, ignore_eos=True)) == \
        text(call(server, temperature=0, max_tokens=16, ignore_eos=True))


def _temperature(server, call) -> None:
    greedy = {text(call(server, temperature=0, max_tokens=16, ignore_eos=True)) for _ in range(2)}
    hot = {text(call(server, temperature=2.0, max_tokens=16, ignore_eos=True, seed=s)) for s in range(3)}
    assert len(greedy) == 1 and len(hot) > 1


def _stop(server, call) -> None:
    full = text(call(server, **GREEDY))
    stop = full[len(full) // 2:len(full) // 2 + 3]
    body = call(server, **GREEDY, stop=[stop])
    assert body["choices"][0]["finish_reason"] == "stop" and stop not in text(body)
    assert full.startswith(text(body))


def _stream(server, path: str, body: dict) -> list[dict]:
    with server.http() as c, c.stream("POST", path, json={"model": server.model, **body}) as r:
        assert r.status_code == 200
        return [json.loads(e) for e in sse_events(r.iter_lines()) if e != "[DONE]"]


def _user_logged(server, call, field: str) -> None:
    body = call(server, max_tokens=2, **{field: "end-user-1234"})
    assert f"{body['id']}: " in server.log() and "end-user-1234" in server.log()


CHAT_EFFECTS = {
    "messages": lambda s: text(chat(s, max_tokens=4)) is not None,
    "model": lambda s: chat(s, max_tokens=2)["model"] == s.model,
    "max_tokens": lambda s: chat(s, max_tokens=3, ignore_eos=True)["usage"]["completion_tokens"] == 3,
    "max_completion_tokens": lambda s: chat(s, max_completion_tokens=2, ignore_eos=True)["usage"][
        "completion_tokens"] == 2,
    "n": lambda s: len(chat(s, n=2, max_tokens=3)["choices"]) == 2,
    "frequency_penalty": lambda s: _repeats_then_differs(s, chat, "frequency_penalty"),
    "presence_penalty": lambda s: _repeats_then_differs(s, chat, "presence_penalty"),
    "logit_bias": lambda s: _forced_token(s, chat),
    "seed": lambda s: _seeded(s, chat),
    "temperature": lambda s: _temperature(s, chat),
    "top_p": lambda s: _top_p(s, chat),
    "stop": lambda s: _stop(s, chat),
    "logprobs": lambda s: len(chat(s, logprobs=True, max_tokens=3, ignore_eos=True)["choices"][0]["logprobs"][
        "content"]) == 3,
    "top_logprobs": lambda s: all(len(e["top_logprobs"]) == 2 for e in chat(
        s, logprobs=True, top_logprobs=2, max_tokens=3)["choices"][0]["logprobs"]["content"]),
    "response_format": lambda s: isinstance(json.loads(text(chat(s, response_format={"type": "json_object"},
                                                                 max_tokens=60))), dict),
    "stream": lambda s: _stream(s, "/v1/chat/completions", {"messages": MSG, "stream": True, "max_tokens": 3})[
        -1]["choices"][0]["finish_reason"] is not None,
    "stream_options": lambda s: _stream(s, "/v1/chat/completions", {
        "messages": MSG, "stream": True, "max_tokens": 3, "stream_options": {"include_usage": True}})[-1][
        "usage"]["completion_tokens"] > 0,
    "tools": lambda s: chat(s, tools=[TOOL], tool_choice="required", parallel_tool_calls=False, max_tokens=40)[
        "choices"][0][
        "message"]["tool_calls"][0]["function"]["name"] == "f",
    "tool_choice": lambda s: json.loads(chat(s, tools=[TOOL], tool_choice={"type": "function", "function": {
        "name": "f"}}, max_tokens=40)["choices"][0]["message"]["tool_calls"][0]["function"]["arguments"])["x"]
        is not None,
    "parallel_tool_calls": lambda s: len(chat(s, tools=[TOOL], tool_choice="required", parallel_tool_calls=False,
                                              max_tokens=40)["choices"][0]["message"]["tool_calls"]) == 1,
    "user": lambda s: _user_logged(s, chat, "user"),
    "safety_identifier": lambda s: _user_logged(s, chat, "safety_identifier"),
}


def _best_of(server) -> None:
    """best_of=4, n=2 returns the 2 of the 4 same-seed candidates with the highest summed logprob."""
    seeded = dict(temperature=1.0, seed=11, max_tokens=8, ignore_eos=True)
    every = cmpl(server, n=4, logprobs=0, **seeded)["choices"]
    ranked = sorted(every, key=lambda c: -sum(c["logprobs"]["token_logprobs"]))
    best = cmpl(server, n=2, best_of=4, **seeded)
    assert [c["text"] for c in best["choices"]] == [c["text"] for c in ranked[:2]]
    assert [c["index"] for c in best["choices"]] == [0, 1] and best["choices"][0]["logprobs"] is None
    assert best["usage"]["completion_tokens"] == 32  # every candidate was generated


def _echo(server) -> None:
    assert text(cmpl(server, echo=True, max_tokens=2)).startswith("Once upon a time")


def _suffix(server) -> None:
    r = server.post("/v1/completions", json={"model": server.model, "prompt": "def f(", "suffix": "return x"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "suffix"


COMPLETION_EFFECTS = {
    "prompt": lambda s: text(cmpl(s, max_tokens=2)) is not None,
    "model": lambda s: cmpl(s, max_tokens=2)["model"] == s.model,
    "best_of": _best_of,
    "echo": _echo,
    "suffix": _suffix,  # refused: no fill-in-the-middle format
    "max_tokens": lambda s: cmpl(s, max_tokens=3, ignore_eos=True)["usage"]["completion_tokens"] == 3,
    "n": lambda s: len(cmpl(s, n=3, max_tokens=2)["choices"]) == 3,
    "frequency_penalty": lambda s: _repeats_then_differs(s, cmpl, "frequency_penalty"),
    "presence_penalty": lambda s: _repeats_then_differs(s, cmpl, "presence_penalty"),
    "logit_bias": lambda s: _forced_token(s, cmpl),
    "logprobs": lambda s: all(len(t) == 2 for t in cmpl(s, logprobs=2, max_tokens=3, temperature=0)["choices"][0][
        "logprobs"][
        "top_logprobs"]),
    "seed": lambda s: _seeded(s, cmpl),
    "temperature": lambda s: _temperature(s, cmpl),
    "top_p": lambda s: _top_p(s, cmpl),
    "stop": lambda s: _stop(s, cmpl),
    "stream": lambda s: _stream(s, "/v1/completions", {"prompt": "Hi", "stream": True, "max_tokens": 3})[-1][
        "choices"][0]["finish_reason"] is not None,
    "stream_options": lambda s: _stream(s, "/v1/completions", {
        "prompt": "Hi", "stream": True, "max_tokens": 3, "stream_options": {"include_usage": True}})[-1][
        "usage"]["completion_tokens"] > 0,
    "user": lambda s: _user_logged(s, cmpl, "user"),
}

# a value each unsupported field might carry, which the server must refuse
REFUSED_VALUES = {
    "audio": {"voice": "alloy", "format": "wav"}, "modalities": ["text", "audio"], "function_call": "auto",
    "functions": [{"name": "f"}], "store": True, "metadata": {"k": "v"}, "moderation": {"model": "m"},
    "prediction": {"type": "content", "content": "x"}, "prompt_cache_key": "k", "prompt_cache_options": {"a": 1},
    "prompt_cache_retention": "24h", "reasoning_effort": "low", "verbosity": "low", "service_tier": "flex",
    "web_search_options": {},
}


def test_every_sdk_field_is_classified():
    chat_fields = sdk_fields(openai.resources.chat.completions.Completions.create)
    assert chat_fields == set(CHAT_EFFECTS) | set(CHAT_UNSUPPORTED)
    assert set(REFUSED_VALUES) == set(CHAT_UNSUPPORTED)
    assert sdk_fields(openai.resources.completions.Completions.create) == set(COMPLETION_EFFECTS)


@pytest.mark.parametrize("field", sorted(CHAT_EFFECTS))
def test_chat_field_has_its_effect(server, field):
    assert CHAT_EFFECTS[field](server) is not False


@pytest.mark.parametrize("field", sorted(COMPLETION_EFFECTS))
def test_completion_field_has_its_effect(server, field):
    assert COMPLETION_EFFECTS[field](server) is not False


@pytest.mark.parametrize("field", sorted(CHAT_UNSUPPORTED))
def test_unsupported_chat_field_is_refused_unless_a_no_op(server, field):
    r = server.post("/v1/chat/completions", json={"model": server.model, "messages": MSG, "max_tokens": 2,
                                                   field: REFUSED_VALUES[field]})
    assert r.status_code == 400 and r.json()["error"]["param"] == field, r.text
    for value in CHAT_UNSUPPORTED[field][0]:
        chat(server, max_tokens=2, **{field: value})


@pytest.mark.parametrize("path,body,param", [
    ("/v1/chat/completions", {"messages": MSG, "temprature": 0.5}, "temprature"),
    ("/v1/completions", {"prompt": "hi", "max_token": 5}, "max_token"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi", "mood": "x"}]}, "messages[0].mood"),
    ("/v1/chat/completions", {"messages": [{"role": "assistant", "content": "hi", "refusal": "no"}]},
     "messages[0].refusal"),
    ("/v1/chat/completions", {"messages": MSG, "stream": True, "stream_options": {"include_obfuscation": True}},
     "stream_options.include_obfuscation"),
    ("/v1/chat/completions", {"messages": MSG, "stream": True, "stream_options": {"include_usage": True, "x": 1}},
     "stream_options.x"),
    ("/v1/chat/completions", {"messages": MSG, "tools": [TOOL]}, "tool_choice"),  # auto: no parser here
    ("/tokenize", {"prompt": "hi", "bogus": 1}, "bogus"),
])
def test_unknown_or_unusable_fields_are_400(server, path, body, param):
    r = server.post(path, json={"model": server.model, **body})
    assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text
    assert param.split(".")[-1] in r.json()["error"]["message"]


def test_a_reply_sent_back_in_the_history_is_accepted(server):
    """The SDK's message objects carry refusal/annotations/audio/function_call as nulls."""
    reply = chat(server, max_tokens=3)["choices"][0]["message"]
    history = MSG + [{**reply, "refusal": None, "annotations": [], "audio": None, "function_call": None},
                     {"role": "user", "content": "go on"}]
    r = server.post("/v1/chat/completions", json={"model": server.model, "messages": history, "max_tokens": 2})
    assert r.status_code == 200, r.text
