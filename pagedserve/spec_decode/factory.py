"""Building the configured proposer (checked against the target at start) and the speculator."""

from __future__ import annotations

from typing import TYPE_CHECKING

from pagedserve.spec_decode.config import SpeculativeConfig
from pagedserve.spec_decode.ngram import NgramProposer
from pagedserve.spec_decode.proposer import Proposer
from pagedserve.spec_decode.speculator import Speculator

if TYPE_CHECKING:
    from pagedserve.engine.core import EngineCore


def build_speculator(spec: SpeculativeConfig, core: EngineCore) -> Speculator:
    k = spec.num_speculative_tokens
    if k + 1 > core.config.scheduler.max_num_batched_tokens:
        raise ValueError(f"speculative_config.num_speculative_tokens must be < max_num_batched_tokens "
                         f"({core.config.scheduler.max_num_batched_tokens}), got {k}")
    if k + 1 >= core.capacity_tokens:
        raise ValueError(f"speculative_config.num_speculative_tokens must leave room in the KV cache "
                         f"({core.capacity_tokens} slots), got {k}")
    proposer: Proposer
    if spec.method == "ngram":
        proposer = NgramProposer(k, spec.prompt_lookup_min, spec.prompt_lookup_max)
    elif spec.method == "draft_model":
        from pagedserve.spec_decode.draft_model import DraftModelProposer

        proposer = DraftModelProposer.build(spec, core)
    else:
        from pagedserve.spec_decode.layer_skip import LayerSkipProposer

        proposer = LayerSkipProposer.build(spec, core)
    return Speculator(spec, proposer, core.max_model_len)
