"""Tool-call parsing and streaming without a server: the hermes parser, auto's held-back marker,
required/named replies, and the CLI's parser list."""

from __future__ import annotations

import json

from pagedserve.entrypoints.openai import cli
from pagedserve.entrypoints.openai.tool_calls import PARSERS, ToolPlan, ToolStream, parse_hermes

TOOLS = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}},
         {"type": "function", "function": {"name": "g"}}]


def test_cli_offers_every_parser():
    assert set(cli.TOOL_CALL_PARSERS) == set(PARSERS)


def test_hermes_calls_and_content():
    text = 'Let me check.\n<tool_call>\n{"name": "f", "arguments": {"a": 1}}\n</tool_call>\n' \
           '<tool_call>{"name": "g", "arguments": {}}</tool_call>'
    content, calls = parse_hermes(text)
    assert content == "Let me check."
    assert [(c.function.name, json.loads(c.function.arguments)) for c in calls] == [("f", {"a": 1}), ("g", {})]
    assert len({c.id for c in calls}) == 2
    # an unterminated last call (the model stopped at EOS) still counts; a malformed one is content
    assert parse_hermes('<tool_call>{"name": "f", "arguments": {}}')[1][0].function.name == "f"
    assert parse_hermes('<tool_call>{"name": "f", "arguments": ')[1] == []
    assert parse_hermes("no calls here") == ("no calls here", [])


def test_auto_stream_holds_back_a_possible_marker():
    stream = ToolStream(ToolPlan("auto", TOOLS, parser="hermes"))
    sent = []
    for piece in ["Sure", ", one moment <to", "ol_c", 'all>{"name": "f", ', '"arguments": {"x": 2}}</tool_call>']:
        content, calls = stream.feed(piece)
        assert calls is None
        sent.append(content or "")
    assert "".join(sent) == "Sure, one moment "  # "<to" was held back until it proved to be the marker
    content, calls = stream.finish()
    assert content is None and calls[0].function.name == "f" and json.loads(calls[0].function.arguments) == {"x": 2}
    assert stream.has_calls


def test_auto_stream_without_a_call_sends_everything():
    stream = ToolStream(ToolPlan("auto", TOOLS, parser="hermes"))
    out = [stream.feed(p)[0] or "" for p in ["a <", "b"]]
    rest, calls = stream.finish()
    assert "".join(out) + (rest or "") == "a <b" and calls is None and not stream.has_calls


def test_named_stream_sends_arguments_as_written():
    stream = ToolStream(ToolPlan("named", TOOLS, name="f"))
    first = stream.feed('{"a"')[1][0]
    assert first.id and first.function.name == "f" and first.function.arguments == '{"a"'
    second = stream.feed(": 1}")[1][0]
    assert second.id is None and second.function.name is None and second.function.arguments == ": 1}"
    assert stream.finish() == (None, None) and stream.has_calls


def test_required_reply_and_a_cut_short_one():
    plan = ToolPlan("required", TOOLS)
    content, calls = plan.parse('[{"name": "g", "parameters": {}}, {"name": "f", "parameters": {"k": [1]}}]')
    assert content is None and [c.function.name for c in calls] == ["g", "f"]
    assert json.loads(calls[1].function.arguments) == {"k": [1]}
    assert plan.parse('[{"name": "g", "param') == ('[{"name": "g", "param', [])
    schema = plan.grammar.json
    assert schema["minItems"] == 1 and "maxItems" not in schema
    assert ToolPlan("required", TOOLS, parallel=False).grammar.json["maxItems"] == 1
    # a function without parameters takes an empty object
    assert ToolPlan("named", TOOLS, name="g").grammar.json == {"type": "object", "properties": {}}
