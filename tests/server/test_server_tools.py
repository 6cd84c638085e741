"""Tool calling through the official `openai` client: a real server on a tiny Llama whose chat template
shows tools (Hermes format), started with --enable-auto-tool-choice --tool-call-parser hermes."""

from __future__ import annotations

import json

import jsonschema
import openai
import pytest

from tests.server.test_server_support import launch_server

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city.",
    "parameters": {"type": "object", "properties": {
        "city": {"type": "string", "maxLength": 20},
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
        "days": {"type": "integer", "minimum": 1, "maximum": 7}},
        "required": ["city", "unit", "days"], "additionalProperties": False}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "parameters": {"type": "object", "properties": {"zone": {"type": "string", "maxLength": 10}},
                                       "required": ["zone"], "additionalProperties": False}}}
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in (WEATHER, TIME)}
ASK = [{"role": "user", "content": "What is the weather in Paris for three days?"}]
NAMED = {"type": "function", "function": {"name": "get_weather"}}


@pytest.fixture(scope="module")
def server(tiny_tool_llama_dir):
    with launch_server(str(tiny_tool_llama_dir), "--num-blocks", "512", "--num-threads", "1",
                       "--enable-auto-tool-choice", "--tool-call-parser", "hermes") as s:
        yield s


@pytest.fixture(scope="module")
def client(server):
    return server.openai()


def test_named_function_arguments_validate(client, server):
    r = client.chat.completions.create(model=server.model, messages=ASK, tools=[WEATHER, TIME], tool_choice=NAMED,
                                       max_tokens=120, temperature=0)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.function.name == "get_weather" and call.id.startswith("call_")
    jsonschema.validate(json.loads(call.function.arguments), SCHEMAS["get_weather"])


def test_required_calls_validate_and_parallel_false_gives_one(client, server):
    for parallel in (True, False):
        for seed in range(3):
            r = client.chat.completions.create(model=server.model, messages=ASK, tools=[WEATHER, TIME],
                                               tool_choice="required", parallel_tool_calls=parallel,
                                               max_tokens=200, temperature=1.0, seed=seed)
            choice = r.choices[0]
            assert choice.finish_reason == "tool_calls", choice
            calls = choice.message.tool_calls
            assert calls and (parallel or len(calls) == 1)
            for call in calls:
                jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])


def test_named_function_streams_arguments(client, server):
    kwargs = dict(model=server.model, messages=ASK, tools=[WEATHER], tool_choice=NAMED, max_tokens=120, temperature=0)
    plain = client.chat.completions.create(**kwargs).choices[0].message.tool_calls[0]
    chunks = list(client.chat.completions.create(stream=True, **kwargs))
    deltas = [d for c in chunks for d in (c.choices[0].delta.tool_calls or []) if c.choices]
    assert deltas[0].id and deltas[0].function.name == "get_weather"
    assert all(d.index == 0 for d in deltas) and len(deltas) > 2  # the arguments arrive in pieces
    assert "".join(d.function.arguments or "" for d in deltas) == plain.function.arguments
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_required_streams_whole_calls(client, server):
    chunks = list(client.chat.completions.create(model=server.model, messages=ASK, tools=[WEATHER, TIME],
                                                 tool_choice="required", parallel_tool_calls=False, max_tokens=200,
                                                 temperature=0, stream=True))
    deltas = [d for c in chunks if c.choices for d in (c.choices[0].delta.tool_calls or [])]
    assert deltas and all(d.id and d.function.name in SCHEMAS for d in deltas)
    for d in deltas:
        jsonschema.validate(json.loads(d.function.arguments), SCHEMAS[d.function.name])
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_tool_message_round_trip(client, server):
    first = client.chat.completions.create(model=server.model, messages=ASK, tools=[WEATHER], tool_choice=NAMED,
                                           max_tokens=120, temperature=0).choices[0].message
    history = ASK + [first.model_dump(exclude_none=True),  # the reply as the SDK gives it back
                     {"role": "tool", "tool_call_id": first.tool_calls[0].id, "content": "sunny, 21 degrees"}]
    r = client.chat.completions.create(model=server.model, messages=history, tools=[WEATHER], tool_choice="none",
                                       max_tokens=8, temperature=0)
    assert r.choices[0].finish_reason in ("stop", "length") and not r.choices[0].message.tool_calls
    # The template saw the call and the tool's answer.
    ids = server.post("/tokenize", json={"messages": history, "tools": [WEATHER]}).json()["tokens"]
    text = server.post("/detokenize", json={"tokens": ids}).json()["prompt"]
    assert '"name": "get_weather"' in text and "sunny, 21 degrees" in text
    assert f'<tool_response id="{first.tool_calls[0].id}">' in text and "<tools>" in text
    assert r.usage.prompt_tokens == len(ids)


def test_auto_without_a_call_is_content(client, server):
    r = client.chat.completions.create(model=server.model, messages=ASK, tools=[WEATHER], max_tokens=10,
                                       temperature=0, extra_body={"ignore_eos": True})
    choice = r.choices[0]
    assert choice.finish_reason == "length" and not choice.message.tool_calls and choice.message.content


def test_tool_errors_name_the_field(client, server):
    cases = [
        (dict(tool_choice="required"), "tool_choice"),  # no tools
        (dict(tools=[WEATHER], tool_choice={"type": "function", "function": {"name": "nope"}}), "tool_choice"),
        (dict(tools=[WEATHER, WEATHER], tool_choice="required"), "tools"),
        (dict(tools=[{"type": "function", "function": {"name": "f", "parameters": {"type": "bogus"}}}],
              tool_choice="required"), "tools"),
        (dict(tools=[WEATHER], tool_choice="required", response_format={"type": "json_object"}), "tool_choice"),
        (dict(tools=[{"type": "retrieval"}]), "tools[0].type"),
        (dict(tools=[WEATHER], extra_body={"use_beam_search": True, "n": 2}), "tools"),
    ]
    for kwargs, param in cases:
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(model=server.model, messages=ASK, max_tokens=4, **kwargs)
        assert e.value.body["param"] == param, (kwargs, e.value.body)
    assert client.chat.completions.create(model=server.model, messages=ASK, max_tokens=2).choices


def test_auto_needs_a_parser_and_a_tool_format(tiny_llama_dir):
    """SmolLM2's template has no tool format: "auto" is a 400 naming tool_choice; forced calls still work."""
    with launch_server(str(tiny_llama_dir), "--num-blocks", "256", "--num-threads", "1",
                       "--enable-auto-tool-choice", "--tool-call-parser", "hermes") as server:
        client = server.openai()
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(model=server.model, messages=ASK, tools=[WEATHER], max_tokens=4)
        assert e.value.body["param"] == "tool_choice" and "no tool-call format" in e.value.body["message"]
        r = client.chat.completions.create(model=server.model, messages=ASK, tools=[WEATHER], tool_choice=NAMED,
                                           max_tokens=120, temperature=0)
        jsonschema.validate(json.loads(r.choices[0].message.tool_calls[0].function.arguments), SCHEMAS["get_weather"])
