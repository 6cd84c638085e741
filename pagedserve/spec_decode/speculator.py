"""The model runner's one handle on speculative decoding: after each step it decides whether the
next step speculates, asks the proposer for drafts, and keeps the counters and the step timings the
decision is made from."""

from __future__ import annotations

import logging
import time

from pagedserve.core.sched.output import ScheduledRequest, SchedulerOutput
from pagedserve.spec_decode.config import SpeculativeConfig
from pagedserve.spec_decode.controller import Candidate, SpeculationController
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

    def record_verification(self, request_id: str, num_draft: int, num_accepted: int) -> None:
        self.stats.record(num_draft, num_accepted)
        self.controller.observe_request(request_id, num_draft, num_accepted)

    def after_step(self, sched: SchedulerOutput, emitted: dict[str, list[int]], step_seconds: float) -> dict[str, list[int]]:
        """This step's tokens are known: time it, then draft for the next one."""
        self.controller.observe_step(sum(s.num_new_tokens for s in sched.scheduled), step_seconds)
        self.controller.next_step(s.request.request_id for s in sched.scheduled)
        self.proposer.forget(sched.finished_req_ids)
        self.controller.forget(sched.finished_req_ids)
        items = [self._item(s, emitted.get(s.request.request_id, [])) for s in sched.scheduled]
        try:
            drafts = self._draft(items)
        except Exception:  # a failing proposer costs this step its speculation, never the requests
            logger.exception("speculative proposer failed; this step runs without proposals")
            drafts = {}
        drafts = {rid: d for rid, d in drafts.items() if d}
        if drafts:
            self.stats.num_steps_speculated += 1
        else:
            self.stats.num_steps_plain += 1
        return drafts

    def _draft(self, items: list[DraftItem]) -> dict[str, list[int]]:
        """Proposals within the controller's plan. A cheap proposer (lookup) proposes first, so the plan
        knows which requests have drafts at all; a model-based one drafts only what the plan asks for."""
        batch = len(items)
        if not getattr(self.proposer, "model_based", False):
            found = self.proposer.propose(items)
            plan = self.controller.plan(batch, [Candidate(rid, len(d)) for rid, d in found.items()], False)
            return {rid: found[rid][:n] for rid, n in plan.items()}
        pending = getattr(self.proposer, "pending_tokens", lambda item: 0)
        candidates = [Candidate(it.request.request_id, it.max_drafts, pending(it), self._remaining(it))
                      for it in items]
        plan = self.controller.plan(batch, candidates, True)
        for it in items:
            it.max_drafts = plan.get(it.request.request_id, 0)
        # A pass's cost is learned from steps that catch up on no more than the last step's tokens: a
        # first catch-up (a prompt, a stretch of plain steps) is paid once, not per pass.
        steady = all(c.catch_up <= self.config.num_speculative_tokens + 1 for c in candidates if c.request_id in plan)
        # Called even with nothing to draft: the proposer sees every step (where each request starts).
        started = time.perf_counter()
        drafts = self.proposer.propose(items)
        passes = getattr(self.proposer, "pass_seconds", [])
        if len(passes) >= 2:  # one-token passes after the first: the cost of a pass, catch-up aside
            self.controller.observe_proposal(batch, len(passes) - 1, sum(passes[1:]))
        elif plan and steady:
            self.controller.observe_proposal(batch, max(plan.values()), time.perf_counter() - started)
        return drafts

    def _remaining(self, item: DraftItem) -> int:
        max_tokens = item.request.params.max_tokens or self.max_model_len
        return max(1, max_tokens - (len(item.token_ids) - item.request.num_prompt_tokens))

    def _item(self, s: ScheduledRequest, new_ids: list[int]) -> DraftItem:
        req = s.request
        verified = s.num_new_tokens - (s.num_spec_tokens + 1 - len(new_ids) if s.num_spec_tokens else 0)
        num_out = len(req.output_token_ids) + len(new_ids)
        total = req.num_tokens + len(new_ids)
        allowed = 0
        if new_ids and not s.forks and req.beam_group is None:
            max_tokens = req.params.max_tokens or self.max_model_len
            # Room for the drafts plus the token sampled after them, within max_tokens and the context.
            allowed = max(0, min(self.config.num_speculative_tokens, max_tokens - num_out - 1,
                                 self.max_model_len - total - 1))
        return DraftItem(req, req.all_token_ids + new_ids, req.num_computed_tokens, verified, s.block_ids, allowed)
