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
    until_disconnect,
)
from pagedserve.outputs import Logprob, RequestOutput


def apply_chat_template(inputs: InputProcessor, messages: list[ChatMessage],
                        add_generation_prompt: bool = True) -> list[int]:
    """Token ids of the conversation rendered with the model's own template (400 if it has none)."""
    if not messages:
        raise bad_request("messages must be a non-empty list", "messages")
    if not inputs.tokenizer.chat_template:
        raise bad_request("this model has no chat template; use /v1/completions", "messages")
    conversation = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in messages]
    try:
        return inputs.apply_chat_template(conversation, add_generation_prompt)
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
        if req.top_logprobs is not None and not req.logprobs:
            raise bad_request("top_logprobs requires logprobs to be true", "top_logprobs")
        size = sum(len(m.text()) for m in req.messages)
        ids = await s.off_loop(size, apply_chat_template, s.inputs, req.messages, req.add_generation_prompt)
        # max_completion_tokens replaces the deprecated max_tokens; None means "as much as fits".
        if req.max_completion_tokens is not None:
            max_tokens, max_param = req.max_completion_tokens, "max_completion_tokens"
        else:
            max_tokens, max_param = req.max_tokens, "max_tokens"
        logprobs = (req.top_logprobs or 0) if req.logprobs else None
        params = s.sampling_params(req, max_tokens, logprobs,
                                   renames={"logprobs": "top_logprobs", "max_tokens": max_param})
        request_id = random_id("chatcmpl")
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
            return StreamingResponse(self._sse(req, request_id, len(ids), group, outputs, first[1]),
                                     media_type="text/event-stream", headers=SSE_HEADERS)
        return JSONResponse(self._response(req, request_id, len(ids), final).model_dump(mode="json"))

    def _response(self, req: ChatCompletionRequest, request_id: str, num_prompt: int,
                  final: RequestOutput) -> ChatCompletionResponse:
        choices = []
        for c in final.outputs:
            logprobs = None
            if req.logprobs and c.logprobs is not None:
                logprobs = chat_logprobs(c.token_ids, c.logprobs, req.top_logprobs or 0, self.serving.tokenizer)
            choices.append(ChatChoice(index=c.index, message=ChatMessageOut(content=c.text), logprobs=logprobs,
                                      finish_reason=c.finish_reason, stop_reason=c.stop_reason))
        generated = sum(len(c.token_ids) for c in final.outputs)
        return ChatCompletionResponse(id=request_id, model=self.serving.model_name, choices=choices,
                                      usage=usage(num_prompt, generated, final.num_cached_tokens or 0),
                                      prompt_logprobs=prompt_logprobs_json(final, self.serving.tokenizer))

    async def _sse(self, req: ChatCompletionRequest, request_id: str, num_prompt: int, group: RequestGroup,
                   outputs: AsyncIterator[tuple[int, RequestOutput]], first: RequestOutput) -> AsyncIterator[str]:
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
                    if c.text_delta or logprobs is not None:
                        yield chunk(c.index, DeltaMessage(content=c.text_delta), logprobs)
                    if c.finished:
                        done.add(c.index)
                        yield chunk(c.index, DeltaMessage(), finish=c.finish_reason)
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
