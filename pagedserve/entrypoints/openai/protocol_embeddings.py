"""The wire format of POST /v1/embeddings (OpenAI's, plus vLLM's truncate_prompt_tokens).

As every request here, an unknown field is a 400 naming it: a client that sends one (say a Matryoshka
or pooling option) expects it to change the vector.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, field_validator

from pagedserve.entrypoints.openai.protocol import OpenAIModel, is_prompt_input, is_token_ids


class EmbeddingRequest(OpenAIModel):
    input: Any  # str | list[str] | list[int] | list[list[int]]; checked below for a clear message
    model: str | None = None
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = None  # must be the hidden size (no Matryoshka training)
    user: str | None = None  # accepted, unused
    truncate_prompt_tokens: int | None = None  # vLLM's: keep the last k tokens (-1: as many as fit)

    @field_validator("input", mode="before")
    @classmethod
    def _input(cls, v: Any) -> Any:
        if is_prompt_input(v):
            return v
        raise ValueError("input must be a string, a list of strings, a list of token ids or a list of "
                         "token-id lists (none of them empty)")

    def prompts(self) -> list[str | list[int]]:
        """The inputs one by one: a flat list of ids is one prompt."""
        v = self.input
        return [v] if isinstance(v, str) or is_token_ids(v) else list(v)


class EmbeddingData(BaseModel):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | str  # str: base64 of little-endian float32 values


class EmbeddingUsage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class EmbeddingResponse(BaseModel):
    object: Literal["list"] = "list"
    data: list[EmbeddingData]
    model: str
    usage: EmbeddingUsage
