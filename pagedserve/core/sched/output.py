"""What the scheduler hands the model runner for one step."""

from __future__ import annotations

from dataclasses import dataclass, field

from pagedserve.core.request import Request


@dataclass
class ScheduledRequest:
    request: Request
    num_new_tokens: int  # tokens from position request.num_computed_tokens on, spec tokens included
    block_ids: list[int]
    num_spec_tokens: int = 0  # of num_new_tokens, proposed tokens to verify (after the known ones)
    # n > 1 siblings that share this request's prompt: forked from its blocks once this step computes
    # the prompt, each sampling its own first token from the same logits row.
    forks: list[Request] = field(default_factory=list)

    @property
    def completes_prompt(self) -> bool:
        """After this step every known token is in the cache, so the next token can be sampled."""
        return self.request.num_computed_tokens + self.num_new_tokens >= self.request.num_tokens


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledRequest] = field(default_factory=list)
    preempted: list[Request] = field(default_factory=list)
    # Requests that left the core since the previous step: the runner drops their per-request state.
    finished_req_ids: set[str] = field(default_factory=set)
    # Copy on write: (source block, destination block) pairs to copy in the cache before the forward.
    blocks_to_copy: list[tuple[int, int]] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.scheduled)

    @property
    def empty(self) -> bool:
        return not self.scheduled
