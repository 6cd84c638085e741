"""What completions and chat share: validation before admission, admission, streams, disconnects."""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

from fastapi import Request

from pagedserve.engine.async_engine import EngineDeadError, EngineOverloadedError, EngineStepError
from pagedserve.engine.input_processor import EngineInput, InputError
from pagedserve.engine.protocol import EngineClient
from pagedserve.entrypoints.openai.errors import (
    APIError,
    bad_request,
    from_value_error,
    internal_error,
    overloaded,
    unavailable,
)
from pagedserve.entrypoints.openai.protocol import SamplingFields
from pagedserve.entrypoints.openai.unsupported import STREAM_OPTIONS_UNSUPPORTED, check_unsupported
from pagedserve.outputs import RequestOutput
from pagedserve.sampling_params import BeamSearchParams, SamplingParams
from pagedserve.structured_output.params import KINDS as STRUCTURED_KINDS
from pagedserve.structured_output.params import StructuredOutputsParams

logger = logging.getLogger(__name__)
T = TypeVar("T")
OFF_LOOP_CHARS = 8192


@dataclass
class ServerConfig:
    served_model_name: str
    api_key: str | None = None
    # Requests admitted beyond what the running batch holds (max_num_seqs); more get 503.
    max_queued_requests: int = 256
    max_body_bytes: int = 1 << 20
    retry_after_s: int = 1
    # Tokens gathered per streamed event (the --stream-interval of vLLM and SGLang); 1 = every token.
    stream_interval: int = 1
    # tool_choice "auto" parses the model's own tool-call format (vLLM's options; tool_calls.py).
    enable_auto_tool_choice: bool = False
    tool_call_parser: str | None = None
    # The live page (/dashboard): seconds between snapshots, and its bounds per snapshot.
    dashboard_interval_s: float = 0.5
    dashboard_max_cells: int = 16384
    dashboard_max_rows: int = 100


@dataclass
class Prompt:
    """One prompt as the engine gets it (token ids) and as echo shows it (text)."""

    text: str
    token_ids: list[int]


RequestStream = AsyncIterator[RequestOutput]


class ClientDisconnected(Exception):
    """The HTTP client went away; its requests were aborted."""


def random_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


class RequestGroup:
    """The engine requests behind one HTTP request (one per prompt); aborting is idempotent."""

    def __init__(self, engine: EngineClient, request_ids: list[str], streams: list[RequestStream]) -> None:
        self.engine = engine
        self.request_ids = request_ids
        self.streams = streams

    def abort(self) -> None:
        for rid in self.request_ids:  # EngineClient.abort ignores requests that have already ended
            self.engine.abort(rid)

    def outputs(self) -> AsyncIterator[tuple[int, RequestOutput]]:
        return merge_streams(self.streams)


def prompt_logprobs_json(out: RequestOutput, tokenizer) -> list[dict[str, dict] | None] | None:
    """vLLM's `prompt_logprobs` shape: per prompt token, {token id: {logprob, rank, decoded_token}}."""
    if out.prompt_logprobs is None:
        return None
    return [None if d is None else {str(t): {"logprob": lp.logprob, "rank": lp.rank,
                                             "decoded_token": lp.decoded_token} for t, lp in d.items()}
            for d in out.prompt_logprobs]


class OpenAIServing:
    """Everything here goes through the EngineClient: its input processor validates and tokenizes
    (once: the engine does not check again), its streams carry the outputs."""

    def __init__(self, engine: EngineClient, config: ServerConfig) -> None:
        self.engine = engine
        self.inputs = engine.input_processor
        self.tokenizer = self.inputs.tokenizer  # the front end's own copy
        self.config = config
        self.model_name = config.served_model_name
        info = engine.model_info()
        self.max_model_len = info.max_model_len
        self.vocab_size = info.vocab_size
        self.auto_tool_parser = config.tool_call_parser if config.enable_auto_tool_choice else None
        self._template_has_tools: bool | None = None

    @property
    def template_has_tools(self) -> bool:
        if self._template_has_tools is None:
            from pagedserve.entrypoints.openai.tool_calls import template_renders_tools

            self._template_has_tools = template_renders_tools(self.tokenizer)
        return self._template_has_tools

    # --- validation (nothing here touches the engine) -----------------------------------------

    def check_model(self, model: str | None) -> None:
        if model is not None and model != self.model_name:
            raise APIError(400, f"model {model!r} is not served here; this server serves {self.model_name!r}",
                           "invalid_request_error", "model", "model_not_found")

    def check_common(self, req: SamplingFields) -> None:
        self.check_model(req.model)
        if req.stream_options is not None and not req.stream:
            raise bad_request("stream_options is only allowed when stream is true", "stream_options")
        if req.stream_options is not None:
            check_unsupported(req.stream_options, STREAM_OPTIONS_UNSUPPORTED, "stream_options.")
        if req.stream and req.prompt_logprobs is not None:
            raise bad_request("prompt_logprobs is not supported with stream", "prompt_logprobs")

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.inputs.encode(text, add_special_tokens)

    @staticmethod
    def logit_bias(wire: dict[str, float] | None) -> dict[int, float] | None:
        """OpenAI sends token ids as JSON object keys (strings); SamplingParams checks the biases."""
        if not wire:
            return None
        try:
            return {int(token): bias for token, bias in wire.items()}
        except (TypeError, ValueError):
            raise bad_request(f"logit_bias keys must be token ids (integers as strings), got {list(wire)!r}",
                              "logit_bias") from None

    async def off_loop(self, size: int, fn: Callable[..., T], *args: object) -> T:
        """Run tokenizer work for a long input in a worker thread, so that the event loop keeps
        streaming other requests' tokens meanwhile; short inputs are cheaper done in place."""
        if size < OFF_LOOP_CHARS:
            return fn(*args)
        return await asyncio.to_thread(fn, *args)

    async def tokenize_inputs(self, inputs: list[str | list[int]], param: str) -> list[Prompt]:
        """Completions' prompts or embeddings' inputs, each a string (tokenized, off the event loop when
        long) or token ids (checked); the text is empty for token ids. 400 naming `param`."""
        if len(inputs) > self.engine.max_in_flight:
            raise bad_request(f"at most {self.engine.max_in_flight} {param}s per request", param)
        out = []
        for p in inputs:
            if isinstance(p, str):
                if not p:
                    raise bad_request(f"{param} must not be empty", param)
                out.append(Prompt(p, await self.off_loop(len(p), self.encode, p)))
            else:
                self.check_token_ids(p, param)
                out.append(Prompt("", list(p)))
        return out

    def check_token_ids(self, ids: list[int], param: str) -> None:
        try:
            self.inputs.check_token_ids(ids, param)
        except InputError as e:
            raise input_error(e) from None

    def engine_inputs(self, request_id: str, prompts: Sequence[Prompt], params: SamplingParams, arrival_time: float,
                      prompt_param: str, max_tokens_param: str, cache_salt: str | None = None,
                      priority: int = 0) -> list[EngineInput]:
        """The input processor's checks (the engine's limits), with the wire names in its errors."""
        try:
            return [self.inputs.process_tokens(f"{request_id}-{i}", p.text or None, p.token_ids, params,
                                               arrival_time, prompt_param, max_tokens_param, cache_salt, priority)
                    for i, p in enumerate(prompts)]
        except InputError as e:
            raise input_error(e) from None

    def beam_inputs(self, request_id: str, req: SamplingFields, prompts: Sequence[Prompt], max_tokens: int,
                    arrival_time: float, prompt_param: str) -> list[EngineInput]:
        """use_beam_search (vLLM's extension): n is the beam width; sampling-only fields are refused."""
        sampling_only = {"top_p": req.top_p not in (None, 1.0), "top_k": req.top_k not in (None, -1),
                         "min_p": req.min_p not in (None, 0.0), "seed": req.seed is not None,
                         "presence_penalty": req.presence_penalty not in (None, 0.0),
                         "frequency_penalty": req.frequency_penalty not in (None, 0.0),
                         "repetition_penalty": req.repetition_penalty not in (None, 1.0),
                         "stream": req.stream, "stop": bool(req.stop), "stop_token_ids": bool(req.stop_token_ids),
                         "min_tokens": req.min_tokens != 0, "prompt_logprobs": req.prompt_logprobs is not None,
                         "logprobs": getattr(req, "logprobs", None) not in (None, False),
                         "include_stop_str_in_output": req.include_stop_str_in_output,
                         "logit_bias": bool(req.logit_bias), "tools": bool(getattr(req, "tools", None)),
                         "response_format": structured_outputs(req) is not None}
        for name, set_ in sampling_only.items():
            if set_:
                raise bad_request(f"{name} cannot be combined with use_beam_search", name)
        try:
            params = BeamSearchParams(beam_width=req.n, max_tokens=max_tokens, ignore_eos=req.ignore_eos,
                                      temperature=req.temperature or 0.0, length_penalty=req.length_penalty,
                                      early_stopping=req.early_stopping)
            out = []
            for i, p in enumerate(prompts):
                prompt = {"prompt_token_ids": p.token_ids}
                if req.cache_salt is not None:
                    prompt["cache_salt"] = req.cache_salt
                inp = self.inputs.process_beam_search(f"{request_id}-{i}", prompt, params, arrival_time,
                                                      req.priority)
                inp.prompt = p.text or None
                out.append(inp)
            return out
        except InputError as e:
            raise input_error(e) from None
        except ValueError as e:
            raise from_value_error(e, {"beam_width": "n"}) from None

    def log_request(self, request_id: str, req: SamplingFields) -> None:
        """OpenAI's end-user ids mean nothing to the engine; the log ties them to the request id."""
        safety = getattr(req, "safety_identifier", None)
        if req.user is not None or safety is not None:
            logger.info("request %s: user=%r safety_identifier=%r", request_id, req.user, safety)

    def sampling_params(self, req: SamplingFields, max_tokens: int | None, logprobs: int | None,
                        renames: dict[str, str] | None = None, prompt_logprobs: int | None = None,
                        structured: StructuredOutputsParams | None = None, n: int | None = None) -> SamplingParams:
        """SamplingParams checks every range; its message names the field, renamed to the wire name.
        `structured` is a grammar the endpoint chose itself (a forced tool call)."""
        values = dict(
            n=req.n if n is None else n, temperature=req.temperature, top_p=req.top_p, top_k=req.top_k, min_p=req.min_p,
            repetition_penalty=req.repetition_penalty, presence_penalty=req.presence_penalty,
            frequency_penalty=req.frequency_penalty, seed=req.seed, max_tokens=max_tokens,
            min_tokens=req.min_tokens, stop=req.stop, stop_token_ids=req.stop_token_ids,
            ignore_eos=req.ignore_eos, logprobs=logprobs,
            prompt_logprobs=req.prompt_logprobs if prompt_logprobs is None else prompt_logprobs,
            include_stop_str_in_output=req.include_stop_str_in_output,
            skip_special_tokens=req.skip_special_tokens, logit_bias=self.logit_bias(req.logit_bias),
            structured_outputs=structured or structured_outputs(req))
        try:
            return SamplingParams(**{k: v for k, v in values.items() if v is not None or k == "max_tokens"})
        except ValueError as e:
            raise from_value_error(e, renames) from None

    # --- admission ----------------------------------------------------------------------------

    async def admit(self, inputs: Sequence[EngineInput]) -> RequestGroup:
        """All prompts are admitted or none: 503 beyond the queue bound, 400 if the engine refuses."""
        if not self.engine.has_capacity(len(inputs)):
            raise overloaded(f"the server is at its limit of {self.engine.max_in_flight} requests in flight; "
                             "retry later", self.config.retry_after_s)
        ids: list[str] = []
        streams: list[RequestStream] = []
        try:
            for inp in inputs:
                streams.append(await self.engine.add_request(inp.request_id, inp))
                ids.append(inp.request_id)
        except BaseException as e:
            RequestGroup(self.engine, ids, streams).abort()
            if isinstance(e, EngineOverloadedError):
                raise overloaded(f"the server is at its limit of requests in flight: {e}",
                                 self.config.retry_after_s) from None
            if isinstance(e, EngineDeadError):
                raise unavailable(str(e)) from None
            if isinstance(e, ValueError):
                raise from_value_error(e) from None
            raise
        return RequestGroup(self.engine, ids, streams)


def input_error(e: InputError) -> APIError:
    return APIError(400, str(e), "invalid_request_error", e.param, e.code)


def engine_error(e: BaseException) -> APIError:
    """An error from a request's stream (its step failed, or the loop died under it) → a 500."""
    if isinstance(e, (EngineStepError, EngineDeadError)):
        return internal_error(str(e))
    return internal_error(f"{type(e).__name__}: {e}")


async def collect(group: RequestGroup) -> list[RequestOutput]:
    """The final output of every request in the group."""
    finals: list[RequestOutput | None] = [None] * len(group.streams)
    async for i, out in group.outputs():
        finals[i] = out
    if any(f is None or not f.finished for f in finals):
        raise EngineDeadError("the request was aborted before it finished")
    return finals  # type: ignore[return-value]


async def merge_streams(streams: Sequence[RequestStream]) -> AsyncIterator[tuple[int, RequestOutput]]:
    """(stream index, output) from several streams as they arrive; the first error ends it."""
    if len(streams) == 1:
        async for out in streams[0]:
            yield 0, out
        return
    queue: asyncio.Queue[tuple[int, RequestOutput | BaseException | None]] = asyncio.Queue()

    async def pump(i: int, stream: RequestStream) -> None:
        try:
            async for out in stream:
                queue.put_nowait((i, out))
        except Exception as e:
            queue.put_nowait((i, e))
            return
        queue.put_nowait((i, None))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    try:
        remaining = len(tasks)
        while remaining:
            i, item = await queue.get()
            if item is None:
                remaining -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield i, item
    finally:
        for t in tasks:
            t.cancel()


async def wait_for_disconnect(raw: Request) -> None:
    """Returns when the client closes the connection (the body has been read already)."""
    while True:
        message = await raw.receive()
        if message["type"] == "http.disconnect":
            return


async def until_disconnect(raw: Request, awaitable: Awaitable[T]) -> T:
    """Await `awaitable` unless the client disconnects first (then it is cancelled)."""
    task = asyncio.ensure_future(awaitable)
    watcher = asyncio.ensure_future(wait_for_disconnect(raw))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
    if task.done() and not task.cancelled():
        return task.result()
    raise ClientDisconnected()


def sse(payload: str) -> str:
    return f"data: {payload}\n\n"


SSE_DONE = "data: [DONE]\n\n"
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}  # no proxy buffering of tokens


def structured_outputs(req: SamplingFields) -> StructuredOutputsParams | None:
    """The one grammar a request asks for, from OpenAI's response_format, vLLM's structured_outputs or
    its older guided_* fields; 400 naming the field when it is malformed or more than one is given."""
    given: list[tuple[str, dict]] = []
    fmt = req.response_format
    if fmt is not None:
        kind = fmt.get("type")
        if kind == "json_object":
            given.append(("response_format", {"json_object": True}))
        elif kind == "json_schema":
            spec = fmt.get("json_schema")
            schema = spec.get("schema") if isinstance(spec, dict) else None
            if not isinstance(schema, dict):
                raise bad_request("response_format.json_schema.schema must be a JSON schema object", "response_format")
            given.append(("response_format", {"json": schema}))
        elif kind != "text":
            raise bad_request(f"response_format.type must be 'text', 'json_object' or 'json_schema', got {kind!r}",
                              "response_format")
    if req.structured_outputs is not None:
        unknown = set(req.structured_outputs) - set(STRUCTURED_KINDS)
        if unknown:
            raise bad_request(f"structured_outputs takes one of {', '.join(STRUCTURED_KINDS)}, got {sorted(unknown)}",
                              "structured_outputs")
        given.append(("structured_outputs", dict(req.structured_outputs)))
    for kind in ("json", "regex", "choice", "grammar"):
        value = getattr(req, f"guided_{kind}")
        if value is not None:
            given.append((f"guided_{kind}", {kind: value}))
    if not given:
        return None
    if len(given) > 1:
        raise bad_request(f"give one of response_format, structured_outputs, guided_*: got {[f for f, _ in given]}",
                          given[1][0])
    field, spec = given[0]
    try:
        return StructuredOutputsParams(**spec)
    except (TypeError, ValueError) as exc:
        raise bad_request(f"{field}: {exc}", field) from None
