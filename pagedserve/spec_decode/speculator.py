"""The model runner's one handle on speculative decoding: after each step it decides whether the
next step speculates, asks the proposer for drafts, and keeps the counters and the step timings the
decision is made from."""

from __future__ import annotations

import logging
import time

from pagedserve.core.sched.output import ScheduledRequest, SchedulerOutput
from pagedserve.spec_decode.config import SpeculativeConfig
from pagedserve.spec_decode.controller import SpeculationController
from pagedserve.spec_decode.proposer import DraftItem, Proposer
from pagedserve.spec_decode.stats import SpecDecodeStats

logger = logging.getLogger(__name__)


class Speculator:
    def __init__(self, config: SpeculativeConfig, proposer: Proposer, max_model_len: int) -> None:
        self.config = config
        self.proposer = proposer
        self.max_model_len = max_model_len
        self.controller = SpeculationController(config.disable_by_batch_size)
        self.stats = SpecDecodeStats()
        self._proposal_seconds = 0.0  # what proposing for this step cost (charged to its measurement)

    def record_verification(self, request_id: str, num_draft: int, num_accepted: int) -> None:
        self.stats.record(num_draft, num_accepted)
        self.controller.observe_request(request_id, num_draft, num_accepted)

    def after_step(self, sched: SchedulerOutput, emitted: dict[str, list[int]], step_seconds: float) -> dict[str, list[int]]:
        """This step's tokens are known: time it, then draft for the next one."""
        speculated = any(s.num_spec_tokens for s in sched.scheduled)
        if all(s.num_new_tokens == 1 + s.num_spec_tokens for s in sched.scheduled):  # decode-only: comparable
            tokens = sum(len(t) for t in emitted.values())
            self.controller.observe_step(len(sched.scheduled), speculated, tokens,
                                         step_seconds + (self._proposal_seconds if speculated else 0.0))
        self.controller.next_step()
        self.proposer.forget(sched.finished_req_ids)
        self.controller.forget(sched.finished_req_ids)
        started = time.perf_counter()
        on = self.controller.should_speculate(len(sched.scheduled))
        if on:
            self.stats.num_steps_speculated += 1
        else:
            self.stats.num_steps_plain += 1
        items = [self._item(s, emitted.get(s.request.request_id, []), on) for s in sched.scheduled]
        try:
            drafts = self.proposer.propose(items)
        except Exception:  # a failing proposer costs this step its speculation, never the requests
            logger.exception("speculative proposer failed; this step runs without proposals")
            drafts = {}
        self._proposal_seconds = time.perf_counter() - started
        return drafts

    def _item(self, s: ScheduledRequest, new_ids: list[int], on: bool) -> DraftItem:
        req = s.request
        verified = s.num_new_tokens - (s.num_spec_tokens + 1 - len(new_ids) if s.num_spec_tokens else 0)
        num_out = len(req.output_token_ids) + len(new_ids)
        total = req.num_tokens + len(new_ids)
        allowed = 0
        if (on and new_ids and not s.forks and req.beam_group is None
                and self.controller.eligible(req.request_id)):
            max_tokens = req.params.max_tokens or self.max_model_len
            # Room for the drafts plus the token sampled after them, within max_tokens and the context.
            allowed = max(0, min(self.config.num_speculative_tokens, max_tokens - num_out - 1,
                                 self.max_model_len - total - 1))
        return DraftItem(req, req.all_token_ids + new_ids, req.num_computed_tokens, verified, s.block_ids, allowed)
