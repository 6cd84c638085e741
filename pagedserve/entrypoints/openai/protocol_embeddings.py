"""The wire format of POST /v1/embeddings (OpenAI's, plus vLLM's truncate_prompt_tokens).

Stricter than the other requests: an unknown field is a 400 naming it, since a client that sends
one (say a Matryoshka or pooling option) expects it to change the vector.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, field_validator

from pagedserve.entrypoints.openai.protocol import OpenAIModel


def _is_ids(x: Any) -> bool:
    return isinstance(x, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in x)


class EmbeddingRequest(OpenAIModel):
    model_config = ConfigDict(strict=True, extra="forbid")

    input: Any  # str | list[str] | list[int] | list[list[int]]; checked below for a clear message
    model: str | None = None
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = None  # must be the hidden size (no Matryoshka training)
    user: str | None = None  # accepted, unused
    truncate_prompt_tokens: int | None = None  # vLLM's: keep the last k tokens (-1: as many as fit)

    @field_validator("input", mode="before")
    @classmethod
    def _input(cls, v: Any) -> Any:
        if isinstance(v, str) or (v and _is_ids(v)):
            return v
        if isinstance(v, list) and v and (all(isinstance(p, str) for p in v) or all(_is_ids(p) for p in v)):
            return v
        raise ValueError("input must be a string, a list of strings, a list of token ids or a list of "
                         "token-id lists (none of them empty)")

    def prompts(self) -> list[str | list[int]]:
        """The inputs one by one: a flat list of ids is one prompt."""
        v = self.input
        return [v] if isinstance(v, str) or _is_ids(v) else list(v)


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
