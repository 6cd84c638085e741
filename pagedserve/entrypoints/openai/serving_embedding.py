"""POST /v1/embeddings: one prompt-only engine request per input, each answered with its pooled vector
(the engine's pooling_type, L2-normalized), as floats or as base64 of little-endian float32."""

from __future__ import annotations

import base64
import sys
import time
from array import array

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from pagedserve.engine.input_processor import InputError
from pagedserve.entrypoints.openai.errors import from_value_error
from pagedserve.entrypoints.openai.protocol_embeddings import (
    EmbeddingData,
    EmbeddingRequest,
    EmbeddingResponse,
    EmbeddingUsage,
)
from pagedserve.entrypoints.openai.serving_base import (
    ClientDisconnected,
    OpenAIServing,
    collect,
    engine_error,
    input_error,
    random_id,
    until_disconnect,
)
from pagedserve.pooling_params import PoolingParams


def encode_base64(vector: list[float]) -> str:
    """OpenAI's base64 format: the float32 values' little-endian bytes."""
    values = array("f", vector)
    if sys.byteorder == "big":
        values.byteswap()
    return base64.b64encode(values.tobytes()).decode("ascii")


class OpenAIServingEmbedding:
    def __init__(self, serving: OpenAIServing) -> None:
        self.serving = serving

    async def _token_ids(self, req: EmbeddingRequest) -> list[list[int]]:
        return [p.token_ids for p in await self.serving.tokenize_inputs(req.prompts(), "input")]

    async def create(self, req: EmbeddingRequest, raw: Request) -> Response:
        arrival = time.monotonic()
        s = self.serving
        s.check_model(req.model)
        try:
            params = PoolingParams(dimensions=req.dimensions, truncate_prompt_tokens=req.truncate_prompt_tokens)
        except ValueError as e:
            raise from_value_error(e) from None
        token_ids = await self._token_ids(req)
        request_id = random_id("embd")
        try:
            inputs = [s.inputs.process_pooling_tokens(f"{request_id}-{i}", None, ids, params, arrival, "input")
                      for i, ids in enumerate(token_ids)]
        except InputError as e:
            raise input_error(e) from None
        group = await s.admit(inputs)
        try:
            finals = await until_disconnect(raw, collect(group))
        except BaseException as e:
            group.abort()  # frees the KV blocks of whatever is still running
            if isinstance(e, ClientDisconnected):
                return Response(status_code=499)
            if isinstance(e, Exception):
                raise engine_error(e) from e
            raise
        data = []
        for i, out in enumerate(finals):
            if out.pooling_output is None:
                raise engine_error(RuntimeError(f"input {i} finished without an embedding"))
            vector = out.pooling_output
            data.append(EmbeddingData(index=i, embedding=encode_base64(vector) if req.encoding_format == "base64"
                                      else vector))
        prompt_tokens = sum(len(inp.prompt_token_ids) for inp in inputs)  # after truncation
        body = EmbeddingResponse(data=data, model=s.model_name,
                                 usage=EmbeddingUsage(prompt_tokens=prompt_tokens, total_tokens=prompt_tokens))
        return JSONResponse(body.model_dump(mode="json"))
