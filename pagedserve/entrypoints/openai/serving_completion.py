"""POST /v1/completions: one engine request per prompt, n choices each, plain or streamed (SSE)."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from dataclasses import replace

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from pagedserve.entrypoints.openai.errors import bad_request
from pagedserve.entrypoints.openai.protocol import (
    CompletionChoice,
    CompletionLogProbs,
    CompletionRequest,
    CompletionResponse,
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
from pagedserve.outputs import CompletionOutput, Logprob, RequestOutput

DEFAULT_MAX_TOKENS = 16  # OpenAI's default for the completions endpoint


def completion_logprobs(token_ids: list[int], logprobs: list[dict[int, Logprob]], offset: int,
                        tokenizer) -> CompletionLogProbs:
    """The legacy logprobs object: each token, its logprob, the top alternatives, text offsets."""
    out = CompletionLogProbs()
    for tid, alternatives in zip(token_ids, logprobs, strict=False):
        chosen = alternatives.get(tid)
        token = chosen.decoded_token if chosen and chosen.decoded_token is not None else tokenizer.decode([tid])
        out.tokens.append(token)
        out.token_logprobs.append(chosen.logprob if chosen else None)
        ranked = sorted(alternatives.items(), key=lambda kv: (kv[1].rank is None, kv[1].rank or 0))
        out.top_logprobs.append({lp.decoded_token or tokenizer.decode([t]): lp.logprob for t, lp in ranked})
        out.text_offset.append(offset)
        offset += len(token)
    return out


def echoed_prompt_logprobs(prompt_ids: list[int], final: RequestOutput, tokenizer,
                           completion: CompletionLogProbs) -> CompletionLogProbs:
    """echo + logprobs: the prompt's tokens first (the first one has no logprob: nothing precedes it),
    then the completion's, offsets counted from the start of the echoed text."""
    scored = final.prompt_logprobs or [None] * len(prompt_ids)
    first = tokenizer.decode(prompt_ids[:1])
    out = CompletionLogProbs(text_offset=[0], token_logprobs=[None], tokens=[first], top_logprobs=[None])
    rest = completion_logprobs(prompt_ids[1:], scored[1:], len(first), tokenizer)
    offset = len(first) + sum(len(t) for t in rest.tokens)
    for part in (rest, completion):
        out.tokens += part.tokens
        out.token_logprobs += part.token_logprobs
        out.top_logprobs += part.top_logprobs
    out.text_offset += rest.text_offset + [offset + o - (completion.text_offset[0] if completion.text_offset else 0)
                                           for o in completion.text_offset]
    return out


def best_candidates(outputs: list[CompletionOutput], n: int) -> list[CompletionOutput]:
    """The n of best_of candidates with the highest cumulative logprob, renumbered 0..n-1 (all of them,
    unchanged, when best_of is n)."""
    if len(outputs) <= n:
        return outputs

    def score(c: CompletionOutput) -> float:
        return sum(step[t].logprob for t, step in zip(c.token_ids, c.logprobs or [], strict=False) if t in step)
    ranked = sorted(outputs, key=lambda c: (-score(c), c.index))[:n]
    return [replace(c, index=i, cumulative_logprob=score(c)) for i, c in enumerate(ranked)]


class OpenAIServingCompletion:
    def __init__(self, serving: OpenAIServing) -> None:
        self.serving = serving

    async def _prompts(self, req: CompletionRequest) -> list[Prompt]:
        raw = req.prompt
        if isinstance(raw, str) or (raw and isinstance(raw[0], int)):
            raw = [raw]
        prompts = await self.serving.tokenize_inputs(raw, "prompt")
        if req.echo:  # echo shows token-id prompts as their text
            for p in prompts:
                p.text = p.text or self.serving.tokenizer.decode(p.token_ids)
        return prompts

    async def create(self, req: CompletionRequest, raw: Request) -> Response:
        arrival = time.monotonic()
        s = self.serving
        s.check_common(req)
        if req.suffix:
            raise bad_request("suffix is not supported", "suffix")
        best_of = req.n if req.best_of is None else req.best_of
        if best_of < req.n:
            raise bad_request(f"best_of must be at least n ({req.n}), got {best_of}", "best_of")
        if best_of > req.n and (req.stream or req.use_beam_search):
            raise bad_request("best_of greater than n cannot be combined with "
                              f"{'stream' if req.stream else 'use_beam_search'}", "best_of")
        echo_logprobs = req.echo and req.logprobs is not None  # the prompt's logprobs (lm-eval's loglikelihood)
        if echo_logprobs and req.stream:
            raise bad_request("echo with logprobs is not supported with stream", "echo")
        if req.max_tokens == 0 and not req.echo:
            raise bad_request("max_tokens must be at least 1 (0 is allowed only with echo)", "max_tokens")
        prompts = await self._prompts(req)
        max_tokens = DEFAULT_MAX_TOKENS if req.max_tokens is None else req.max_tokens
        # max_tokens 0 with echo scores the prompt only: one token is computed and not returned.
        # best_of ranks its candidates by cumulative logprob: the chosen tokens' logprobs are needed.
        logprobs = req.logprobs if best_of == req.n else (req.logprobs or 0)
        params = s.sampling_params(req, max(max_tokens, 1), logprobs, n=best_of, renames={"n": "best_of"} if best_of > req.n else None,
                                   prompt_logprobs=req.logprobs if echo_logprobs else None)
        request_id = random_id("cmpl")
        s.log_request(request_id, req)
        if req.use_beam_search:
            inputs = s.beam_inputs(request_id, req, prompts, max(max_tokens, 1), arrival, "prompt")
        else:
            inputs = s.engine_inputs(request_id, prompts, params, arrival, "prompt", "max_tokens", req.cache_salt,
                                     req.priority)
        group = await s.admit(inputs)
        try:
            if req.stream:
                outputs = group.outputs()
                # The first output comes before the headers: a failure of the first step is still a 500.
                first = await until_disconnect(raw, anext(outputs))
            else:
                finals = await until_disconnect(raw, collect(group))
        except BaseException as e:
            group.abort()  # frees the KV blocks of whatever is still running
            if isinstance(e, ClientDisconnected):
                return Response(status_code=499)  # nobody is listening
            if isinstance(e, Exception):
                raise engine_error(e) from e
            raise
        if req.stream:
            return StreamingResponse(self._sse(req, request_id, prompts, group, outputs, first),
                                     media_type="text/event-stream", headers=SSE_HEADERS)
        return JSONResponse(self._response(req, request_id, prompts, finals).model_dump(mode="json"))

    def _response(self, req: CompletionRequest, request_id: str, prompts: list[Prompt],
                  finals: list[RequestOutput]) -> CompletionResponse:
        choices = []
        completion_tokens = 0
        tokenizer = self.serving.tokenizer
        prompt_only = req.max_tokens == 0
        for pi, (prompt, final) in enumerate(zip(prompts, finals, strict=True)):
            prefix = prompt.text if req.echo else ""
            # best_of: every candidate counts as generated (as OpenAI bills it), the n best are returned
            completion_tokens += 0 if prompt_only else sum(len(c.token_ids) for c in final.outputs)
            for c in best_candidates(final.outputs, req.n):
                ids, text = ([], "") if prompt_only else (c.token_ids, c.text)
                logprobs = None
                if req.logprobs is not None and c.logprobs is not None:
                    logprobs = completion_logprobs(ids, c.logprobs, len(prefix), tokenizer)
                    if req.echo:
                        logprobs = echoed_prompt_logprobs(prompt.token_ids, final, tokenizer, logprobs)
                choices.append(CompletionChoice(index=pi * req.n + c.index, text=prefix + text, logprobs=logprobs,
                                                finish_reason="length" if prompt_only else c.finish_reason,
                                                stop_reason=None if prompt_only else c.stop_reason))
        prompt_tokens = sum(len(p.token_ids) for p in prompts)
        cached = sum(f.num_cached_tokens or 0 for f in finals)
        prompt_logprobs = None
        if req.prompt_logprobs is not None:
            prompt_logprobs = [prompt_logprobs_json(f, tokenizer) for f in finals]
        return CompletionResponse(id=request_id, model=self.serving.model_name, choices=choices,
                                  usage=usage(prompt_tokens, completion_tokens, cached),
                                  prompt_logprobs=prompt_logprobs)

    async def _sse(self, req: CompletionRequest, request_id: str, prompts: list[Prompt], group: RequestGroup,
                   outputs: AsyncIterator[tuple[int, RequestOutput]], first: tuple[int, RequestOutput]
                   ) -> AsyncIterator[str]:
        n = req.n
        include_usage = req.stream_options is not None and req.stream_options.include_usage
        offsets: dict[int, int] = {}  # choice index → text length sent (for logprobs text_offset)
        done: set[int] = set()
        completion_tokens: dict[int, int] = {}
        cached_tokens: dict[int, int] = {}  # per prompt

        def chunk(index: int, text: str, logprobs: CompletionLogProbs | None, finish: str | None,
                  stop_reason: int | str | None = None) -> str:
            choice = CompletionChoice(index=index, text=text, logprobs=logprobs, finish_reason=finish,
                                      stop_reason=stop_reason)
            body = CompletionResponse(id=request_id, model=self.serving.model_name, choices=[choice])
            return sse(body.model_dump_json(exclude_none=False, exclude={"usage"} if not include_usage else None))

        def choice_chunk(pi: int, c: CompletionOutput) -> str | None:
            index = pi * n + c.index
            if index in done:
                return None
            completion_tokens[index] = len(c.token_ids)
            logprobs = None
            if req.logprobs is not None and c.logprobs is not None and c.token_ids_delta:
                k = len(c.token_ids_delta)
                logprobs = completion_logprobs(c.token_ids_delta, c.logprobs[-k:], offsets.get(index, 0),
                                               self.serving.tokenizer)
            if not c.text_delta and logprobs is None and not c.finished:
                return None
            offsets[index] = offsets.get(index, 0) + len(c.text_delta)
            if c.finished:
                done.add(index)
            return chunk(index, c.text_delta, logprobs, c.finish_reason, c.stop_reason)

        try:
            if req.echo:
                for pi, p in enumerate(prompts):
                    for i in range(n):
                        offsets[pi * n + i] = len(p.text)
                        yield chunk(pi * n + i, p.text, None, None)
            item: tuple[int, RequestOutput] | None = first
            while item is not None:
                pi, out = item
                if out.num_cached_tokens is not None:
                    cached_tokens[pi] = out.num_cached_tokens
                for c in out.outputs:
                    text = choice_chunk(pi, c)
                    if text is not None:
                        yield text
                item = await anext(outputs, None)
            if include_usage:
                prompt_tokens = sum(len(p.token_ids) for p in prompts)
                generated = sum(completion_tokens.values())
                body = CompletionResponse(id=request_id, model=self.serving.model_name, choices=[],
                                          usage=usage(prompt_tokens, generated, sum(cached_tokens.values())))
                yield sse(body.model_dump_json())
        except Exception as e:  # headers are out: report in-band, as vLLM does
            yield sse(engine_error(e).response().body.decode())
        finally:
            group.abort()  # the client went away mid-stream, or an error: free the blocks now
            await outputs.aclose()
        yield SSE_DONE
