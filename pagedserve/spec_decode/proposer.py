"""What a proposer sees after a step, and the interface every proposer has."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import torch

from pagedserve.core.request import Request

if TYPE_CHECKING:
    from pagedserve.worker.model_runner import ModelInputs


@dataclass
class DraftItem:
    """One request the step ran, as the proposers see it once the step's tokens are known."""

    request: Request
    token_ids: list[int]  # its whole context after this step (prompt, output, this step's new tokens)
    start: int  # first position this step computed
    num_verified: int  # positions start.. whose K/V this step computed and that stand (rejected drafts excluded)
    block_ids: list[int]
    max_drafts: int  # proposals it may take (max_tokens, the context length); 0: none wanted this step

    @property
    def sampled(self) -> bool:
        """The step produced a new token for it (not a prompt chunk short of the prompt's end)."""
        return len(self.token_ids) > self.start + self.num_verified


class Proposer(Protocol):
    # True: drafting costs forward passes, so the controller plans before it drafts; False (lookup):
    # proposing is cheap, so it proposes first and the plan keeps what pays.
    model_based: bool

    def propose(self, items: list[DraftItem]) -> dict[str, list[int]]:
        """Proposed tokens (after each item's last token) by request id; an item may get none."""

    def forget(self, request_ids: Iterable[str]) -> None:
        """Drop the state of requests that left the engine."""

    def forward(self, inputs: ModelInputs) -> torch.Tensor | None:
        """The step's forward (hidden states after the final norm) when the proposer can do it with work
        it already did; None: the runner runs the model."""

    def copy_blocks(self, copies: list[tuple[int, int]]) -> None:
        """Copy on write in any KV cache of the proposer's own (before the step's forward)."""
