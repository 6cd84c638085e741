"""Tool calling on chat completions: `tools` go through the model's chat template, `tool_choice`
decides what the reply may be, and the generated text becomes OpenAI `tool_calls`.

- "none": tools are shown to the model, the reply is plain content.
- "required" / a named function: the output is constrained (structured outputs) to a JSON array of
  {"name", "parameters"} calls / to the named function's parameter schema, as vLLM does.
- "auto" (the default when tools are given): the model decides; its text is parsed with the tool-call
  parser the server was started with (--tool-call-parser; hermes is built in). Without one, or with a
  template that has no tool format, "auto" is a 400 naming tool_choice: a guess would be worse.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

from pagedserve.entrypoints.openai.errors import bad_request
from pagedserve.entrypoints.openai.protocol import (
    ChatCompletionRequest,
    ChatMessage,
    DeltaFunctionCall,
    DeltaToolCall,
    FunctionCallOut,
    ToolCallOut,
)
from pagedserve.structured_output.params import StructuredOutputsParams

NO_ARGUMENTS = {"type": "object", "properties": {}}


def tool_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def conversation(messages: list[ChatMessage]) -> list[dict[str, Any]]:
    """Messages as chat templates read them. Tool-call arguments become objects (transformers'
    convention: templates write them with `tojson`)."""
    out = []
    for m in messages:
        msg: dict[str, Any] = {"role": "system" if m.role == "developer" else m.role, "content": m.text()}
        if m.name is not None:
            msg["name"] = m.name
        if m.tool_call_id is not None:
            msg["tool_call_id"] = m.tool_call_id
        if m.tool_calls:
            msg["tool_calls"] = [{"id": c.id, "type": "function",
                                  "function": {"name": c.function.name, "arguments": _arguments(c.function.arguments)}}
                                 for c in m.tool_calls]
        out.append(msg)
    return out


def _arguments(text: str) -> Any:
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        return text
    return value if isinstance(value, dict) else text


def template_renders_tools(tokenizer) -> bool:
    """Whether the chat template shows tools to the model at all (one that ignores them has no
    tool-call format to parse)."""
    probe = [{"role": "user", "content": "hi"}]
    tool = {"type": "function", "function": {"name": "probe_tool_xyz", "description": "d", "parameters": NO_ARGUMENTS}}
    try:
        plain = tokenizer.apply_chat_template(probe, tokenize=False, add_generation_prompt=True)
        with_tools = tokenizer.apply_chat_template(probe, tools=[tool], tokenize=False, add_generation_prompt=True)
    except Exception:
        return False
    return plain != with_tools


@dataclass
class ToolPlan:
    """What one chat request's tools mean for its prompt, its grammar and its reply."""

    mode: str  # "none" | "auto" | "required" | "named"
    tools: list[dict[str, Any]]  # as the template reads them
    name: str | None = None  # the forced function
    parallel: bool = True
    parser: str | None = None  # for "auto"

    @cached_property  # made (and its grammar parsed) once per request
    def grammar(self) -> StructuredOutputsParams | None:
        if self.mode == "named":
            return StructuredOutputsParams(json=self._parameters(self.name))
        if self.mode == "required":
            calls = {"type": "array", "minItems": 1,
                     "items": {"anyOf": [{"type": "object",
                                          "properties": {"name": {"type": "string", "enum": [t["function"]["name"]]},
                                                         "parameters": self._parameters(t["function"]["name"])},
                                          "required": ["name", "parameters"], "additionalProperties": False}
                                         for t in self.tools]}}
            if not self.parallel:
                calls["maxItems"] = 1
            return StructuredOutputsParams(json=calls)
        return None

    def _parameters(self, name: str | None) -> dict[str, Any]:
        fn = next(t["function"] for t in self.tools if t["function"]["name"] == name)
        return fn.get("parameters") or NO_ARGUMENTS

    def parse(self, text: str) -> tuple[str | None, list[ToolCallOut]]:
        """(content, tool calls) of a finished reply; text that is not a complete call stays content."""
        if self.mode == "named":
            return None, [ToolCallOut(id=tool_call_id(), function=FunctionCallOut(name=self.name, arguments=text))]
        if self.mode == "required":
            try:
                calls = json.loads(text)
                return None, [ToolCallOut(id=tool_call_id(), function=FunctionCallOut(
                    name=c["name"], arguments=json.dumps(c["parameters"], ensure_ascii=False))) for c in calls]
            except (json.JSONDecodeError, TypeError, KeyError):  # cut short by max_tokens
                return text, []
        if self.mode == "auto":
            content, calls = PARSERS[self.parser](text)
            if not self.parallel:
                calls = calls[:1]
            return content, calls
        return text, []


def plan_tools(req: ChatCompletionRequest, auto_parser: str | None, template_has_tools: bool) -> ToolPlan | None:
    """The request's tool plan, or None without tools; 400 naming the field for what cannot work."""
    if not req.tools:
        if req.tool_choice not in (None, "none"):
            raise bad_request("tool_choice needs tools", "tool_choice")
        return None
    tools = [t.model_dump(exclude_none=True) for t in req.tools]
    names = [t["function"]["name"] for t in tools]
    if len(set(names)) != len(names):
        raise bad_request(f"tools must have distinct function names, got {names}", "tools")
    for t in tools:  # a schema xgrammar cannot compile is refused now, naming the tool
        try:
            StructuredOutputsParams(json=t["function"].get("parameters") or NO_ARGUMENTS)
        except ValueError as e:
            raise bad_request(f"tools: function {t['function']['name']!r} has unusable parameters: {e}",
                              "tools") from None
    choice = req.tool_choice if req.tool_choice is not None else "auto"
    plan = ToolPlan(mode="named" if not isinstance(choice, str) else choice, tools=tools,
                    parallel=req.parallel_tool_calls)
    if plan.mode == "named":
        plan.name = choice.function.name
        if plan.name not in names:
            raise bad_request(f"tool_choice names function {plan.name!r}, which is not in tools {names}",
                              "tool_choice")
    if plan.mode == "auto":
        if auto_parser is None:
            raise bad_request('tool_choice "auto" needs a server started with --enable-auto-tool-choice and '
                              '--tool-call-parser; use "required", "none" or a named function', "tool_choice")
        if not template_has_tools:
            raise bad_request('tool_choice "auto": this model\'s chat template has no tool-call format; use '
                              '"required", "none" or a named function (their arguments are constrained)',
                              "tool_choice")
        plan.parser = auto_parser
    return plan


# --- hermes format: <tool_call>{"name": ..., "arguments": {...}}</tool_call> -----------------------------

HERMES_START, HERMES_END = "<tool_call>", "</tool_call>"
_HERMES = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", re.DOTALL)


def parse_hermes(text: str) -> tuple[str | None, list[ToolCallOut]]:
    """Calls written as Hermes / Qwen models write them; a malformed call leaves the whole text as content."""
    start = text.find(HERMES_START)
    if start < 0:
        return text, []
    calls = []
    for body in _HERMES.findall(text[start:]):
        try:
            call = json.loads(body)
            name, args = call["name"], call.get("arguments", {})
        except (json.JSONDecodeError, TypeError, KeyError):
            return text, []
        if not isinstance(name, str):
            return text, []
        arguments = args if isinstance(args, str) else json.dumps(args, ensure_ascii=False)
        calls.append(ToolCallOut(id=tool_call_id(), function=FunctionCallOut(name=name, arguments=arguments)))
    content = text[:start].strip()
    return content or None, calls


PARSERS = {"hermes": parse_hermes}  # the CLI's --tool-call-parser choices


# --- streaming ---------------------------------------------------------------------------------------


@dataclass
class ToolStream:
    """One choice's streamed reply under a tool plan: content deltas, then tool-call deltas.

    A named function streams its arguments as they are written (the first delta carries the call's
    id and name, as OpenAI's do). Required and auto calls are sent whole once the reply ends, since a
    call is only known to be one when its JSON closes; auto content before a call streams as it comes,
    holding back what could be the start of the call marker."""

    plan: ToolPlan
    text: str = ""
    sent: int = 0  # characters of text already sent as content (auto)
    started: bool = False
    calls: list[ToolCallOut] = field(default_factory=list)

    def feed(self, delta: str) -> tuple[str | None, list[DeltaToolCall] | None]:
        """(content, tool-call deltas) to send for this much more text."""
        self.text += delta
        if self.plan.mode == "none":
            return delta or None, None
        if self.plan.mode == "named":
            if not delta and self.started:
                return None, None
            first = not self.started
            self.started = True
            call = DeltaToolCall(index=0, function=DeltaFunctionCall(arguments=delta))
            if first:
                call.id, call.type, call.function.name = tool_call_id(), "function", self.plan.name
            return None, [call]
        if self.plan.mode == "auto" and not self.started:
            marker = self.text.find(HERMES_START)
            self.started = marker >= 0
            end = marker if self.started else _safe_end(self.text, HERMES_START)
            if end > self.sent:
                piece, self.sent = self.text[self.sent:end], end
                return piece, None
        return None, None

    def finish(self) -> tuple[str | None, list[DeltaToolCall] | None]:
        """What is left to send once the reply ended: remaining content and the whole calls."""
        if self.plan.mode in ("named", "none"):
            return None, None
        content, self.calls = self.plan.parse(self.text)
        if not self.calls:  # not a call after all: the held-back text is content
            rest = self.text[self.sent:] if self.plan.mode == "auto" else self.text
            return rest or None, None
        deltas = [DeltaToolCall(index=i, id=c.id, type="function",
                                function=DeltaFunctionCall(name=c.function.name, arguments=c.function.arguments))
                  for i, c in enumerate(self.calls)]
        return None, deltas

    @property
    def has_calls(self) -> bool:
        return self.plan.mode == "named" or bool(self.calls)


def _safe_end(text: str, marker: str) -> int:
    """How much of text can be sent without possibly cutting a marker that is still being written."""
    for k in range(min(len(marker) - 1, len(text)), 0, -1):
        if text.endswith(marker[:k]):
            return len(text) - k
    return len(text)
