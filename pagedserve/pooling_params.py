"""PoolingParams: a prompt-only request that returns the model's pooled hidden state (an embedding)
instead of sampled tokens — vLLM's `--task embed`. Validates itself with messages naming the field."""

from __future__ import annotations

from dataclasses import dataclass

# LAST: the last prompt token's final hidden state; MEAN: the mean over every prompt token's.
POOLING_TYPES = ("LAST", "MEAN")


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True)
class PoolingParams:
    normalize: bool = True  # L2-normalize the pooled vector, as vLLM's embed task does by default
    dimensions: int | None = None  # must be the hidden size when given: the model has no Matryoshka training
    # Keep only the last k prompt tokens (vLLM's left truncation); -1: as many as the context allows.
    truncate_prompt_tokens: int | None = None
    # None: the engine's `pooling_type` option (vLLM's pooler config), filled in by the engine core.
    pooling_type: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.normalize, bool):
            raise ValueError(f"normalize must be True or False, got {self.normalize!r}")
        if self.dimensions is not None and not (_is_int(self.dimensions) and self.dimensions >= 1):
            raise ValueError(f"dimensions must be an integer >= 1 or None, got {self.dimensions!r}")
        t = self.truncate_prompt_tokens
        if t is not None and not (_is_int(t) and (t == -1 or t >= 1)):
            raise ValueError(f"truncate_prompt_tokens must be -1, an integer >= 1 or None, got {t!r}")
        if self.pooling_type is not None and self.pooling_type not in POOLING_TYPES:
            raise ValueError(f"pooling_type must be one of {POOLING_TYPES} or None, got {self.pooling_type!r}")

    @property
    def needs_every_token(self) -> bool:
        """MEAN reads every prompt token's hidden state, so a prefix-cache hit (tokens not computed)
        would drop some from the mean; LAST reads only the last token, which is always computed."""
        return self.pooling_type == "MEAN"
