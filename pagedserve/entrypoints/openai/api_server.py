"""The FastAPI app: routes, error handlers, the request guard and the engine loop's lifespan."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import TypeVar

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from pagedserve import __version__
from pagedserve.engine.async_engine import EngineSource, make_engine_client
from pagedserve.engine.protocol import EngineClient
from pagedserve.entrypoints.openai.dashboard import add_dashboard_routes
from pagedserve.entrypoints.openai.errors import (
    APIError,
    bad_request,
    from_validation_errors,
    internal_error,
    unavailable,
)
from pagedserve.entrypoints.openai.kv_events import router as kv_events_router
from pagedserve.entrypoints.openai.metrics import EngineMetrics
from pagedserve.entrypoints.openai.middleware import RequestGuard
from pagedserve.entrypoints.openai.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    DetokenizeResponse,
    ModelCard,
    ModelList,
    TokenizeRequest,
    TokenizeResponse,
)
from pagedserve.entrypoints.openai.protocol_embeddings import EmbeddingRequest
from pagedserve.entrypoints.openai.serving_base import OpenAIServing, ServerConfig
from pagedserve.entrypoints.openai.serving_chat import OpenAIServingChat, apply_chat_template
from pagedserve.entrypoints.openai.serving_completion import OpenAIServingCompletion
from pagedserve.entrypoints.openai.serving_embedding import OpenAIServingEmbedding

logger = logging.getLogger(__name__)

_STATUS_TYPES = {401: "authentication_error", 404: "not_found_error", 405: "invalid_request_error",
                 413: "invalid_request_error"}


M = TypeVar("M", bound=BaseModel)


async def parse_body(request: Request, model: type[M]) -> M:
    try:
        return model.model_validate_json(await request.body())
    except ValidationError as e:
        raise from_validation_errors(e.errors()) from None


def _body_schema(model: type[BaseModel]) -> dict:
    return {"requestBody": {"required": True,
                            "content": {"application/json": {"schema": model.model_json_schema()}}}}


def build_app(engine: EngineClient | EngineSource, config: ServerConfig) -> FastAPI:
    """The server talks to the engine only through the EngineClient interface (an LLMEngine, or a
    factory for one, is wrapped in the in-process client)."""
    metrics = EngineMetrics(config.served_model_name)
    async_engine = make_engine_client(engine, config.served_model_name, config.stream_interval)
    async_engine.on_step = metrics.on_step
    info = async_engine.model_info()
    max_in_flight = info.max_num_seqs + config.max_queued_requests
    async_engine.max_in_flight = max_in_flight
    serving = OpenAIServing(async_engine, config)
    completions = OpenAIServingCompletion(serving)
    chat = OpenAIServingChat(serving)
    embeddings = OpenAIServingEmbedding(serving)
    metrics.on_step(async_engine.initial_stats(), [])  # gauges hold real values before the first request

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async_engine.start()
        logger.info("serving %s (max_model_len=%d, %d requests in flight at most)", config.served_model_name,
                    info.max_model_len, max_in_flight)
        try:
            yield
        finally:
            await async_engine.stop()

    app = FastAPI(title="pagedserve", version=__version__, lifespan=lifespan)
    app.state.async_engine = async_engine
    app.state.metrics = metrics
    app.state.serving = serving
    app.add_middleware(RequestGuard, api_key=config.api_key, max_body_bytes=config.max_body_bytes)
    app.state.dashboard = add_dashboard_routes(app, async_engine, config.dashboard_interval_s,
                                               config.dashboard_max_cells, config.dashboard_max_rows)

    app.include_router(kv_events_router)  # GET /kv_events, for a KV-aware router (kv_events.py)

    @app.exception_handler(APIError)
    async def _api_error(request: Request, e: APIError) -> JSONResponse:
        return e.response()

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, e: RequestValidationError) -> JSONResponse:
        return from_validation_errors(e.errors()).response()  # FastAPI's 422 → OpenAI's 400

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, e: StarletteHTTPException) -> JSONResponse:
        err = APIError(e.status_code, str(e.detail), _STATUS_TYPES.get(e.status_code, "invalid_request_error"))
        return err.response()

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, e: Exception) -> JSONResponse:
        logger.exception("unhandled error")
        return internal_error(f"{type(e).__name__}: {e}").response()

    # Bodies are parsed here rather than by FastAPI: JSON whatever the Content-Type (curl -d sends
    # form encoding), and every error becomes one OpenAI 400 naming the field.
    @app.post("/v1/completions", openapi_extra=_body_schema(CompletionRequest))
    async def create_completion(request: Request) -> Response:
        return await completions.create(await parse_body(request, CompletionRequest), request)

    @app.post("/v1/chat/completions", openapi_extra=_body_schema(ChatCompletionRequest))
    async def create_chat_completion(request: Request) -> Response:
        return await chat.create(await parse_body(request, ChatCompletionRequest), request)

    @app.post("/v1/embeddings", openapi_extra=_body_schema(EmbeddingRequest))
    async def create_embedding(request: Request) -> Response:
        return await embeddings.create(await parse_body(request, EmbeddingRequest), request)

    @app.get("/v1/models")
    async def list_models() -> ModelList:
        card = ModelCard(id=config.served_model_name, root=info.path, max_model_len=info.max_model_len)
        return ModelList(data=[card])

    @app.get("/health")
    async def health() -> Response:
        reason = async_engine.unavailable_reason
        if reason is not None:  # dead loop, or draining for shutdown: take this replica out of rotation
            return unavailable(reason).response()
        return Response(status_code=200)

    @app.get("/version")
    async def version() -> dict[str, str]:
        return {"version": __version__}

    @app.get("/metrics")
    async def prometheus_metrics() -> Response:
        content, content_type = metrics.render()
        return Response(content, media_type=content_type)

    @app.post("/tokenize", openapi_extra=_body_schema(TokenizeRequest))
    async def tokenize(request: Request) -> TokenizeResponse:
        body = await parse_body(request, TokenizeRequest)
        serving.check_model(body.model)
        if (body.prompt is None) == (body.messages is None):
            raise bad_request("give exactly one of prompt and messages", "prompt")
        if body.tools is not None and body.messages is None:
            raise bad_request("tools need messages", "tools")
        if body.messages is not None:
            tools = [t.model_dump(exclude_none=True) for t in body.tools] if body.tools else None
            ids = apply_chat_template(serving.inputs, body.messages, body.add_generation_prompt, tools)
        else:
            ids = serving.encode(body.prompt or "", body.add_special_tokens)
        return TokenizeResponse(count=len(ids), max_model_len=info.max_model_len, tokens=ids)

    @app.post("/reset_prefix_cache")
    async def reset_prefix_cache() -> JSONResponse:
        """vLLM's endpoint: forget every cached prefix block (refused while requests hold blocks)."""
        if not await async_engine.reset_prefix_cache():
            raise APIError(409, "the prefix cache cannot be reset while requests hold KV blocks; retry when idle",
                           "conflict_error", None, "cache_in_use")
        return JSONResponse({"reset": True})

    @app.get("/tokenizer_info")
    async def tokenizer_info() -> JSONResponse:
        """The served tokenizer's settings (vLLM's endpoint), so a client such as lm-eval can tokenize
        through /tokenize and /detokenize without downloading it."""
        tok = serving.tokenizer
        special = {name: getattr(tok, name, None) for name in ("bos_token", "eos_token", "pad_token", "unk_token")}
        return JSONResponse({"tokenizer_class": type(tok).__name__, "model": serving.model_name,
                             "vocab_size": len(tok), "model_max_length": serving.max_model_len,
                             "chat_template": getattr(tok, "chat_template", None),
                             "add_bos_token": getattr(tok, "add_bos_token", None),
                             **{k: v if isinstance(v, str) or v is None else str(v) for k, v in special.items()}})

    @app.post("/detokenize", openapi_extra=_body_schema(DetokenizeRequest))
    async def detokenize(request: Request) -> DetokenizeResponse:
        body = await parse_body(request, DetokenizeRequest)
        serving.check_model(body.model)
        serving.check_token_ids(body.tokens, "tokens")
        return DetokenizeResponse(prompt=serving.tokenizer.decode(body.tokens))

    return app
