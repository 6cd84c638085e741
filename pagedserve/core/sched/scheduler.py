"""The scheduler: which requests run in the next step with how many tokens, and what a step's sampled
tokens do to them.

`schedule()` follows the configured policy (continuous.py, static.py); `update_from_output()` is the
only place that advances `num_computed_tokens`, appends tokens, checks stop conditions on token ids
(EOS, stop token ids, max_tokens, the context length) and frees the blocks of finished requests. A
pooling request finishes there too, once the runner has pooled its whole prompt.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch

from pagedserve.config import SchedulerConfig
from pagedserve.core.beam_search import BeamSearchParams, beam_logprobs
from pagedserve.core.kv_cache_manager import KVCacheManager
from pagedserve.core.request import Request, RequestStatus
from pagedserve.core.sched.beam_group import BeamGroup
from pagedserve.core.sched.continuous import schedule_continuous
from pagedserve.core.sched.output import SchedulerOutput
from pagedserve.core.sched.request_queue import WaitingQueue, make_waiting_queue
from pagedserve.core.sched.static import schedule_static
from pagedserve.engine.core_messages import EngineCoreOutput, EngineCoreOutputs
from pagedserve.worker.runner_output import ModelRunnerOutput


@dataclass
class SchedulerStats:
    num_running: int
    num_waiting: int
    num_preemptions: int  # since the start


class Scheduler:
    def __init__(self, config: SchedulerConfig, kv: KVCacheManager, max_model_len: int | None = None) -> None:
        self.config = config
        self.kv = kv
        self.max_model_len = max_model_len
        self.requests: dict[str, Request] = {}
        # Admission order and preemption victims follow config.scheduling_policy (request_queue.py).
        self.waiting: WaitingQueue = make_waiting_queue(config.scheduling_policy)
        self._arrivals = itertools.count()  # Request.queue_order: ties of equal arrival times
        self.running: list[Request] = []
        self.num_preemptions = 0
        self._finished_ids: set[str] = set()
        # n > 1 siblings waiting for the first sibling's prompt, by that sibling's id.
        self._forks: dict[str, list[Request]] = {}
        self.beam_groups: dict[str, BeamGroup] = {}
        policies: dict[str, Callable[[Scheduler], SchedulerOutput]] = {
            "continuous": schedule_continuous, "static": schedule_static}
        self._policy = policies[config.policy]
        # Slots past a step's tokens that a draft model writes its own K/V into (speculative decoding).
        self.num_lookahead_tokens = 0

    def add_beam_search(self, request: Request, params: BeamSearchParams) -> None:
        """A beam search: the request is its first beam (the prompt, computed once)."""
        if request.request_id in self.requests:
            raise ValueError(f"request_id {request.request_id!r} is already in the engine")
        if self.config.policy != "continuous":  # static reservations cannot follow forking beams
            raise ValueError(f"beam search needs the continuous policy, this engine runs {self.config.policy!r}")
        request.beam_group = request.request_id
        request.queue_order = next(self._arrivals)
        self.beam_groups[request.request_id] = BeamGroup.start(request, params)
        self.requests[request.request_id] = request
        self.waiting.add(request)

    def add_request(self, request: Request, fork_of: str | None = None) -> None:
        """Queue a request. With `fork_of` (an n > 1 sibling), it shares that request's prompt: it
        waits until that prompt is computed and then forks its blocks, unless that is no longer
        possible (the sibling has left or is past its prompt), in which case it is an ordinary request."""
        if request.request_id in self.requests:
            raise ValueError(f"request_id {request.request_id!r} is already in the engine")
        self.requests[request.request_id] = request
        request.queue_order = next(self._arrivals)
        parent = self.requests.get(fork_of) if fork_of else None
        if (parent is not None and self.config.policy == "continuous" and not parent.output_token_ids
                and parent.num_computed_tokens < parent.num_tokens):
            self._forks.setdefault(parent.request_id, []).append(request)
        else:
            self.waiting.add(request)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running or self._forks)

    def schedule(self) -> SchedulerOutput:
        out = self._policy(self)
        if self._forks:  # n > 1 siblings wait: the step that completes their sibling's prompt forks them
            for s in out.scheduled:
                if s.completes_prompt and not s.request.output_token_ids:
                    s.forks = self._forks.pop(s.request.request_id, [])
        out.finished_req_ids, self._finished_ids = self._finished_ids, set()
        out.blocks_to_copy = self.kv.take_pending_copies()
        return out

    def stats(self) -> SchedulerStats:
        return SchedulerStats(len(self.running), len(self.waiting), self.num_preemptions)

    # --- helpers the policies share ----------------------------------------------------------------

    def preempt(self, req: Request) -> None:
        """Free its blocks; it waits again (fcfs: at the front) and is recomputed when readmitted.
        A beam's siblings waiting for it (parked, holding blocks) go back to the queue with it, so
        that no blocks are held by sequences that cannot advance."""
        group = self.beam_groups.get(req.beam_group) if req.beam_group is not None else None
        if group is not None:
            for sibling in group.unpark():
                self.requeue(sibling)
        self.requeue(req)

    def requeue(self, req: Request) -> None:
        self.kv.free(req)
        req.spec_token_ids = []
        req.status = RequestStatus.PREEMPTED
        req.num_computed_tokens = 0
        req.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.requeue(req)

    def start_running(self, req: Request) -> None:
        req.status = RequestStatus.RUNNING
        if req.first_scheduled_time is None:
            req.first_scheduled_time = time.monotonic()
        self.running.append(req)

    # --- after the step --------------------------------------------------------------------------

    def update_from_output(self, sched: SchedulerOutput, runner: ModelRunnerOutput) -> EngineCoreOutputs:
        """Apply one step's results. A request may get several tokens (accepted speculative tokens plus
        the one sampled after them); tokens after one that stops it are dropped. Requests finished or
        aborted since `schedule()` are skipped: their late tokens are not appended."""
        now = time.monotonic()
        index = runner.index()
        outputs: list[EngineCoreOutput] = []
        for s in sched.scheduled:
            req = s.request
            if req.is_finished:
                self._release_forks(s.forks)
                continue
            req.num_computed_tokens += s.num_new_tokens
            row = index.get(req.request_id)
            new_ids = runner.sampled_token_ids[row] if row is not None else []
            if s.num_spec_tokens:  # slots of rejected proposals hold K/V nobody may read: recompute them
                req.num_computed_tokens -= s.num_spec_tokens + 1 - len(new_ids)
                req.spec_token_ids = []
            self.kv.cache_computed_blocks(req)
            if req.request_id in runner.prompt_logprobs:
                start, scored = runner.prompt_logprobs[req.request_id]
                have = len(req.prompt_logprobs)  # after a preemption, chunks may split elsewhere
                if start <= have < start + len(scored):
                    req.prompt_logprobs.extend(scored[have - start:])
            for child in s.forks:  # before req's tokens: req may finish and free its blocks below
                if not child.is_finished:
                    child.num_computed_tokens = self.kv.fork(req, child)
                    child.num_cached_tokens = req.num_cached_tokens
                    self.start_running(child)
                    self._append_tokens(child, runner.sampled_token_ids[index[child.request_id]],
                                        runner.logprobs[index[child.request_id]] if runner.logprobs else None,
                                        outputs)
            if req.pooling_params is not None:  # prompt-only: done once the runner pooled its prompt
                if req.request_id in runner.pooler_output:
                    self._finish_pooling(req, runner.pooler_output[req.request_id], outputs)
                continue
            if not new_ids:
                continue  # a prompt chunk that did not reach the prompt's end
            if req.beam_group is not None:
                self._beam_step(req, runner.logits_rows[req.request_id], outputs)
                continue
            self._append_tokens(req, new_ids, runner.logprobs[row] if runner.logprobs else None, outputs)
            if not req.is_finished and req.request_id in runner.spec_token_ids:
                req.spec_token_ids = runner.spec_token_ids[req.request_id]  # the next step verifies them
        return EngineCoreOutputs(outputs, now)

    def _beam_step(self, beam: Request, logits: torch.Tensor, outputs: list[EngineCoreOutput]) -> None:
        group = self.beam_groups[beam.beam_group]
        final = group.report(beam, beam_logprobs(logits, group.params.temperature), self)
        if final is not None:
            del self.beam_groups[group.request_id]
            reason = "stop" if final and final[0].finish_reason == "stop" else "length"
            outputs.append(EngineCoreOutput(group.request_id, [], finish_reason=reason, beams=final,
                                            first_scheduled_time=beam.first_scheduled_time))

    def _finish_pooling(self, req: Request, vector: list[float], outputs: list[EngineCoreOutput]) -> None:
        """A pooling request's prompt is computed: it finishes with its vector, no token appended."""
        outputs.append(EngineCoreOutput(req.request_id, [], finish_reason=RequestStatus.FINISHED_STOPPED.value,
                                        first_scheduled_time=req.first_scheduled_time,
                                        num_preemptions=req.num_preemptions, num_cached_tokens=req.num_cached_tokens,
                                        pooling_output=vector))
        self.finish_request(req, RequestStatus.FINISHED_STOPPED)

    def _append_tokens(self, req: Request, new_ids: list[int], logprobs: list | None,
                       outputs: list[EngineCoreOutput]) -> None:
        status = None
        accepted = 0
        for token in new_ids:
            req.output_token_ids.append(token)
            accepted += 1
            status = self._check_stop(req, token)
            if status is not None:
                break
        logprobs = logprobs[:accepted] if logprobs else None
        first = len(req.output_token_ids) == accepted  # the request's first output: send its start time
        out = EngineCoreOutput(req.request_id, new_ids[:accepted], logprobs,
                               first_scheduled_time=req.first_scheduled_time if first else None,
                               num_preemptions=req.num_preemptions,
                               num_cached_tokens=req.num_cached_tokens if first else None,
                               prompt_logprobs=req.prompt_logprobs if first and req.params.prompt_logprobs is not None
                               else None)
        if status is not None:
            self.finish_request(req, status)
            out.finish_reason, out.stop_reason = status.value, req.stop_reason
        outputs.append(out)

    def _check_stop(self, req: Request, token: int) -> RequestStatus | None:
        p = req.params
        n_out = len(req.output_token_ids)
        may_stop = n_out > p.min_tokens  # the sampler masked EOS/stop ids for the first min_tokens
        if may_stop and not p.ignore_eos and token == req.eos_token_id:
            return RequestStatus.FINISHED_STOPPED
        if may_stop and token in p.stop_token_ids:
            req.stop_reason = token
            return RequestStatus.FINISHED_STOPPED
        if n_out >= (p.max_tokens or 0) or (self.max_model_len is not None and req.num_tokens >= self.max_model_len):
            return RequestStatus.FINISHED_LENGTH
        return None

    def finish_request(self, req: Request, status: RequestStatus) -> None:
        """Finished or aborted: leave the queues and give the blocks back at once."""
        req.status = status
        if req in self.running:
            self.running.remove(req)
        elif req in self.waiting:
            self.waiting.remove(req)
        else:
            for siblings in self._forks.values():
                if req in siblings:
                    siblings.remove(req)
        self._release_forks(self._forks.pop(req.request_id, []))
        self.kv.free(req)
        self.requests.pop(req.request_id, None)
        self._finished_ids.add(req.request_id)

    def _release_forks(self, children: list[Request]) -> None:
        """The sibling they waited for left before computing its prompt: they compute their own (and
        take whatever of it the prefix cache holds)."""
        for c in children:
            if not c.is_finished:
                self.waiting.add(c)

    def reset_prefix_cache(self) -> bool:
        return self.kv.reset_prefix_cache()

    def abort_requests(self, request_ids: Iterable[str]) -> list[str]:
        """Abort those still in the core; returns the ids that were."""
        aborted = []
        for rid in request_ids:
            group = self.beam_groups.pop(rid, None)
            if group is not None:  # every beam, parked ones included
                for beam in group.all_sequences():
                    self.finish_request(beam, RequestStatus.FINISHED_ABORTED)
                aborted.append(rid)
                continue
            req = self.requests.get(rid)
            if req is not None and not req.is_finished:
                self.finish_request(req, RequestStatus.FINISHED_ABORTED)
                aborted.append(rid)
        return aborted
