"""POST /v1/chat/completions: the model's chat template, then one engine request with n choices."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from pagedserve.engine.input_processor import InputProcessor
from pagedserve.entrypoints.openai.errors import bad_request
from pagedserve.entrypoints.openai.protocol import (
    ChatChoice,
    ChatChoiceLogProbs,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatLogProb,
    ChatLogProbEntry,
    ChatMessage,
    ChatMessageOut,
    ChatStreamChoice,
    DeltaMessage,
    usage,
)
from pagedserve.entrypoints.openai.serving_base import (
    SSE_DONE,
    SSE_HEADERS,
    ClientDisconnected,
    OpenAIServing,
    Prompt,
    RequestGroup,
    collect,
    engine_error,
    prompt_logprobs_json,
    random_id,
    sse,
    structured_outputs,
    until_disconnect,
)
from pagedserve.entrypoints.openai.tool_calls import ToolPlan, ToolStream, conversation, plan_tools
from pagedserve.entrypoints.openai.unsupported import CHAT_UNSUPPORTED, MESSAGE_UNSUPPORTED, check_unsupported
from pagedserve.outputs import CompletionOutput, Logprob, RequestOutput


def apply_chat_template(inputs: InputProcessor, messages: list[ChatMessage], add_generation_prompt: bool = True,
                        tools: list[dict] | None = None) -> list[int]:
    """Token ids of the conversation rendered with the model's own template (400 if it has none)."""
    if not messages:
        raise bad_request("messages must be a non-empty list", "messages")
    if not inputs.tokenizer.chat_template:
        raise bad_request("this model has no chat template; use /v1/completions", "messages")
    for i, m in enumerate(messages):
        check_unsupported(m, MESSAGE_UNSUPPORTED, f"messages[{i}].")
        if m.tool_calls and m.role != "assistant":
            raise bad_request("only assistant messages carry tool_calls", f"messages[{i}].tool_calls")
        if m.role == "tool" and m.tool_call_id is None:
            raise bad_request("a tool message needs the tool_call_id it answers", f"messages[{i}].tool_call_id")
    try:
        return inputs.apply_chat_template(conversation(messages), add_generation_prompt, tools)
    except Exception as e:  # the template rejects the conversation (e.g. roles out of order)
        raise bad_request(f"the chat template rejected these messages: {e}", "messages") from e


def chat_logprobs(token_ids: list[int], logprobs: list[dict[int, Logprob]], top: int, tokenizer
                  ) -> ChatChoiceLogProbs:
    def entry(tid: int, lp: Logprob) -> ChatLogProb:
        token = lp.decoded_token if lp.decoded_token is not None else tokenizer.decode([tid])
        return ChatLogProb(token=token, logprob=lp.logprob, bytes=list(token.encode("utf-8")))

    content = []
    for tid, alternatives in zip(token_ids, logprobs, strict=False):
        chosen = alternatives.get(tid, Logprob(float("nan")))
        ranked = sorted((kv for kv in alternatives.items() if kv[1].rank is not None), key=lambda kv: kv[1].rank)
        first = entry(tid, chosen)
        content.append(ChatLogProbEntry(**first.model_dump(),
                                        top_logprobs=[entry(t, lp) for t, lp in ranked[:top]]))
    return ChatChoiceLogProbs(content=content)


class OpenAIServingChat:
    def __init__(self, serving: OpenAIServing) -> None:
        self.serving = serving

    async def create(self, req: ChatCompletionRequest, raw: Request) -> Response:
        arrival = time.monotonic()
        s = self.serving
        s.check_common(req)
        check_unsupported(req, CHAT_UNSUPPORTED)
        if req.top_logprobs is not None and not req.logprobs:
            raise bad_request("top_logprobs requires logprobs to be true", "top_logprobs")
        plan = plan_tools(req, s.auto_tool_parser, s.template_has_tools if req.tools else False)
        if plan is not None and plan.grammar is not None and structured_outputs(req) is not None:
            raise bad_request("a forced tool call constrains the output already; drop response_format / "
                              "structured_outputs or use tool_choice \"auto\" or \"none\"", "tool_choice")
        size = sum(len(m.text()) for m in req.messages)
        ids = await s.off_loop(size, apply_chat_template, s.inputs, req.messages, req.add_generation_prompt,
                               plan.tools if plan else None)
        # max_completion_tokens replaces the deprecated max_tokens; None means "as much as fits".
        if req.max_completion_tokens is not None:
            max_tokens, max_param = req.max_completion_tokens, "max_completion_tokens"
        else:
            max_tokens, max_param = req.max_tokens, "max_tokens"
        logprobs = (req.top_logprobs or 0) if req.logprobs else None
        params = s.sampling_params(req, max_tokens, logprobs,
                                   renames={"logprobs": "top_logprobs", "max_tokens": max_param},
                                   structured=plan.grammar if plan else None)
        request_id = random_id("chatcmpl")
        s.log_request(request_id, req)
        if req.use_beam_search:
            beam_max = max_tokens if max_tokens is not None else s.inputs.limit - len(ids)
            inputs = s.beam_inputs(request_id, req, [Prompt("", ids)], beam_max, arrival, "messages")
        else:
            inputs = s.engine_inputs(request_id, [Prompt("", ids)], params, arrival, "messages", max_param,
                                     req.cache_salt, req.priority)
        group = await s.admit(inputs)
        try:
            if req.stream:
                outputs = group.outputs()
                first = await until_disconnect(raw, anext(outputs))  # before headers: errors stay HTTP errors
            else:
                final = (await until_disconnect(raw, collect(group)))[0]
        except BaseException as e:
            group.abort()
            if isinstance(e, ClientDisconnected):
                return Response(status_code=499)
            if isinstance(e, Exception):
                raise engine_error(e) from e
            raise
        if req.stream:
            return StreamingResponse(self._sse(req, request_id, len(ids), group, outputs, first[1], plan),
                                     media_type="text/event-stream", headers=SSE_HEADERS)
        return JSONResponse(self._response(req, request_id, len(ids), final, plan).model_dump(mode="json"))

    def _response(self, req: ChatCompletionRequest, request_id: str, num_prompt: int,
                  final: RequestOutput, plan: ToolPlan | None) -> ChatCompletionResponse:
        choices = []
        for c in final.outputs:
            logprobs = None
            if req.logprobs and c.logprobs is not None:
                logprobs = chat_logprobs(c.token_ids, c.logprobs, req.top_logprobs or 0, self.serving.tokenizer)
            content, calls = plan.parse(c.text) if plan is not None else (c.text, [])
            choices.append(ChatChoice(index=c.index, message=ChatMessageOut(content=content, tool_calls=calls),
                                      logprobs=logprobs, finish_reason=finish_reason(c, bool(calls)),
                                      stop_reason=c.stop_reason))
        generated = sum(len(c.token_ids) for c in final.outputs)
        return ChatCompletionResponse(id=request_id, model=self.serving.model_name, choices=choices,
                                      usage=usage(num_prompt, generated, final.num_cached_tokens or 0),
                                      prompt_logprobs=prompt_logprobs_json(final, self.serving.tokenizer))

    async def _sse(self, req: ChatCompletionRequest, request_id: str, num_prompt: int, group: RequestGroup,
                   outputs: AsyncIterator[tuple[int, RequestOutput]], first: RequestOutput,
                   plan: ToolPlan | None) -> AsyncIterator[str]:
        """Per choice: a role chunk, content chunks, a chunk with finish_reason; then usage if asked."""
        include_usage = req.stream_options is not None and req.stream_options.include_usage
        created = int(time.time())
        generated: dict[int, int] = {}
        cached = first.num_cached_tokens or 0

        def chunk(index: int, delta: DeltaMessage, logprobs: ChatChoiceLogProbs | None = None,
                  finish: str | None = None) -> str:
            choice = ChatStreamChoice(index=index, delta=delta, logprobs=logprobs, finish_reason=finish)
            body = ChatCompletionChunk(id=request_id, created=created, model=self.serving.model_name,
                                       choices=[choice]).model_dump(mode="json")
            body["choices"][0]["delta"] = delta.model_dump(exclude_none=True)  # {"content": ...} only
            if not include_usage:
                del body["usage"]  # with include_usage it is null in every chunk but the last, as in OpenAI's
            return sse(json.dumps(body, separators=(",", ":")))

        tool_streams = [ToolStream(plan) for _ in range(req.n)] if plan is not None else None
        try:
            for i in range(req.n):
                yield chunk(i, DeltaMessage(role="assistant", content=""))
            done: set[int] = set()
            out: RequestOutput | None = first
            while out is not None:
                for c in out.outputs:
                    if c.index in done:
                        continue
                    generated[c.index] = len(c.token_ids)
                    logprobs = None
                    if req.logprobs and c.logprobs is not None and c.token_ids_delta:
                        k = len(c.token_ids_delta)
                        logprobs = chat_logprobs(c.token_ids_delta, c.logprobs[-k:], req.top_logprobs or 0,
                                                 self.serving.tokenizer)
                    if tool_streams is not None:
                        content, calls = tool_streams[c.index].feed(c.text_delta)
                        if content or calls or logprobs is not None:
                            yield chunk(c.index, DeltaMessage(content=content, tool_calls=calls), logprobs)
                    elif c.text_delta or logprobs is not None:
                        yield chunk(c.index, DeltaMessage(content=c.text_delta), logprobs)
                    if c.finished:
                        done.add(c.index)
                        has_calls = False
                        if tool_streams is not None:
                            content, calls = tool_streams[c.index].finish()
                            if content or calls:
                                yield chunk(c.index, DeltaMessage(content=content, tool_calls=calls))
                            has_calls = tool_streams[c.index].has_calls
                        yield chunk(c.index, DeltaMessage(), finish=finish_reason(c, has_calls))
                item = await anext(outputs, None)
                out = None if item is None else item[1]
            if include_usage:
                total = sum(generated.values())
                body = ChatCompletionChunk(id=request_id, created=created, model=self.serving.model_name,
                                           choices=[], usage=usage(num_prompt, total, cached))
                yield sse(body.model_dump_json())
        except Exception as e:  # headers are out: report in-band, as vLLM does
            yield sse(engine_error(e).response().body.decode())
        finally:
            group.abort()
            await outputs.aclose()
        yield SSE_DONE


def finish_reason(c: CompletionOutput, has_tool_calls: bool) -> str | None:
    """OpenAI's "tool_calls" when a reply that ended by itself is calls; a call cut short stays "length"."""
    return "tool_calls" if has_tool_calls and c.finish_reason == "stop" else c.finish_reason
