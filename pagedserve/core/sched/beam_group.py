"""Beam search inside the core: one request's beams as sequences that share blocks.

The group starts as one sequence (the prompt, computed once). Each step every live beam's logits row
comes back; once all live beams have theirs, BeamSearchState (core/beam_search.py, HF's rules) picks
the next live beams as (parent, token) pairs. A parent picked once keeps its sequence and appends the
token; picked again, it is forked (its blocks shared, the partial one copied on write when each
writes); a parent not picked is freed at once. Beams that reported wait, blocks held, outside the
running batch until their siblings catch up (a sibling may have been preempted).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from pagedserve.core.beam_search import BeamHypothesis, BeamSearchParams, BeamSearchState
from pagedserve.core.request import Request, RequestStatus

if TYPE_CHECKING:
    from pagedserve.core.sched.scheduler import Scheduler


@dataclass
class BeamGroup:
    request_id: str
    state: BeamSearchState
    beams: list[Request]  # in the state's live order
    reported: dict[str, torch.Tensor] = field(default_factory=dict)  # beam id → its logprobs row
    next_beam: int = 1

    @classmethod
    def start(cls, request: Request, params: BeamSearchParams) -> BeamGroup:
        state = BeamSearchState(params, request.num_prompt_tokens, request.eos_token_id)
        return cls(request.request_id, state, [request])

    @property
    def params(self) -> BeamSearchParams:
        return self.state.params

    def report(self, beam: Request, logprobs: torch.Tensor, s: Scheduler) -> list[BeamHypothesis] | None:
        """A live beam's row for this step. Returns the final beams once the search is done."""
        self.reported[beam.request_id] = logprobs
        s.running.remove(beam)  # parked (blocks held) until every live beam has its row
        if len(self.reported) < len(self.beams):
            if any(b.status is not RequestStatus.RUNNING for b in self.beams if b.request_id not in self.reported):
                for parked in self.unpark():  # a sibling was preempted: waiting with blocks held could
                    s.requeue(parked)  # starve everyone, so the parked ones queue up beside it
            return None
        rows = torch.stack([self.reported[b.request_id] for b in self.beams])
        self.reported.clear()
        decision = self.state.step(rows)
        taken: set[int] = set()
        new_beams: list[Request] = []
        for parent_index, _ in decision.continuing:
            parent = self.beams[parent_index]
            if parent_index in taken:  # a second child: share the parent's blocks
                child = self._fork(parent, s)
            else:
                taken.add(parent_index)
                child = parent
            new_beams.append(child)
        # Append after every fork: forks copy the parent's tokens as they were before this step.
        for (_, token), beam in zip(decision.continuing, new_beams, strict=True):
            beam.output_token_ids.append(token)
        for i, beam in enumerate(self.beams):
            if i not in taken:
                s.finish_request(beam, RequestStatus.FINISHED_STOPPED)  # its blocks go back at once
        self.beams = new_beams
        if decision.done:
            for beam in self.beams:
                s.finish_request(beam, RequestStatus.FINISHED_STOPPED)
            self.beams = []
            return self.state.finalize()
        s.running.extend(self.beams)
        return None

    def _fork(self, parent: Request, s: Scheduler) -> Request:
        child = Request(f"{self.request_id}@beam{self.next_beam}", parent.prompt_token_ids, parent.params,
                        parent.eos_token_id, parent.arrival_time, cache_salt=parent.cache_salt,
                        priority=parent.priority)
        child.queue_order = parent.queue_order  # one request: its beams rank together
        self.next_beam += 1
        child.output_token_ids = list(parent.output_token_ids)
        child.status = RequestStatus.RUNNING
        child.first_scheduled_time = parent.first_scheduled_time
        child.beam_group = self.request_id
        child.num_computed_tokens = s.kv.fork(parent, child)
        s.requests[child.request_id] = child
        return child

    def unpark(self) -> list[Request]:
        """The beams that reported this step and wait (their rows are dropped: they recompute)."""
        parked = [b for b in self.beams if b.request_id in self.reported]
        self.reported.clear()
        return parked

    def all_sequences(self) -> list[Request]:
        return list(self.beams)
