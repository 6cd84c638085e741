"""What the model runner returns for one step: sampled token ids per request (a list each), and the
vectors of the pooling requests whose prompt it completed."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from pagedserve.engine.core_messages import RawLogprob


@dataclass
class ModelRunnerOutput:
    req_ids: list[str] = field(default_factory=list)
    # Per request in req_ids: the tokens this step produced for it (one, or several when speculative
    # tokens were accepted; empty for a prompt chunk that did not reach the prompt's end).
    sampled_token_ids: list[list[int]] = field(default_factory=list)
    logprobs: list[list[RawLogprob] | None] | None = None  # per request, per token; None when nobody asked
    # Requests that asked for prompt logprobs: (first prompt position scored, RawLogprobs of the prompt
    # tokens this step's chunk predicts).
    prompt_logprobs: dict[str, tuple[int, list[RawLogprob]]] = field(default_factory=dict)
    # Beams of a beam search: the whole next-token logits row (float32), which the search ranks.
    logits_rows: dict[str, torch.Tensor] = field(default_factory=dict)
    # Speculative decoding: tokens proposed for the next step, by request id.
    spec_token_ids: dict[str, list[int]] = field(default_factory=dict)
    # Pooling requests whose prompt this step completed: the pooled vector, by request id.
    pooler_output: dict[str, list[float]] = field(default_factory=dict)

    def index(self) -> dict[str, int]:
        return {rid: i for i, rid in enumerate(self.req_ids)}
