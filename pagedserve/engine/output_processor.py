"""Output processing: the core's token ids become RequestOutputs — incremental detokenization, stop
strings, logprob dicts with decoded tokens, n > 1 samples gathered under their parent request,
streaming deltas and the request's timestamps.

A stop string is found here, on text, after the core produced the token: the request is then
finished here at once and its core sequence is handed back to be aborted (`reqs_to_abort`); tokens
the core made for it in the meantime are dropped.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from pagedserve.engine.core_messages import EngineCoreOutput, EngineCoreOutputs, RawLogprob
from pagedserve.engine.detokenizer import IncrementalDetokenizer
from pagedserve.engine.input_processor import EngineInput
from pagedserve.outputs import CompletionOutput, Logprob, RequestMetrics, RequestOutput


@dataclass
class _Sample:
    index: int
    core_id: str
    detok: IncrementalDetokenizer
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[dict[int, Logprob]] = field(default_factory=list)
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    emitted_tokens: int = 0
    cumulative_logprob: float | None = None


@dataclass
class _Group:
    request: EngineInput
    samples: list[_Sample]
    metrics: RequestMetrics
    num_cached_tokens: int | None = None
    prompt_logprobs: list[dict[int, Logprob] | None] | None = None
    pooling_output: list[float] | None = None

    @property
    def finished(self) -> bool:
        return all(s.finish_reason is not None for s in self.samples)


@dataclass
class ProcessedOutputs:
    request_outputs: list[RequestOutput]
    reqs_to_abort: list[str]  # core sequence ids stopped here (stop strings): abort them in the core


class OutputProcessor:
    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self._groups: dict[str, _Group] = {}
        self._by_core_id: dict[str, tuple[_Group, _Sample]] = {}

    def __contains__(self, request_id: str) -> bool:
        return request_id in self._groups

    def __len__(self) -> int:
        return len(self._groups)

    def request_id_of(self, core_id: str) -> str | None:
        entry = self._by_core_id.get(core_id)
        return None if entry is None else entry[0].request.request_id

    def add_request(self, request: EngineInput, core_ids: list[str]) -> None:
        p = request.params
        if request.beam_search is not None:  # the beams arrive together at the end: one sample per beam
            core_ids = core_ids * request.beam_search.beam_width
        samples = [_Sample(i, cid, IncrementalDetokenizer(self.tokenizer, request.prompt_token_ids, p.stop,
                                                           p.include_stop_str_in_output, p.skip_special_tokens))
                   for i, cid in enumerate(core_ids)]
        group = _Group(request, samples, RequestMetrics(request.arrival_time, None, None, None))
        self._groups[request.request_id] = group
        for s in samples[::-1]:  # the first sample of a core id is the one it maps to
            self._by_core_id[s.core_id] = (group, s)

    def process_outputs(self, core: EngineCoreOutputs) -> ProcessedOutputs:
        touched: dict[str, _Group] = {}
        to_abort: list[str] = []
        for out in core.outputs:
            entry = self._by_core_id.get(out.request_id)
            if entry is None:
                continue  # aborted here meanwhile
            group, sample = entry
            if out.beams is not None:
                self._apply_beams(group, out, core.timestamp)
                touched[group.request.request_id] = group
                continue
            if sample.finish_reason is not None:
                continue  # stopped here on a stop string; the core's later tokens are dropped
            if self._apply(group, sample, out, core.timestamp):
                to_abort.append(sample.core_id)
            touched[group.request.request_id] = group
        outputs = []
        for group in touched.values():
            outputs.append(self._make_output(group))
            if group.finished:
                self._forget(group)
        return ProcessedOutputs(outputs, to_abort)

    def _apply(self, group: _Group, sample: _Sample, out: EngineCoreOutput, now: float) -> bool:
        """Append the output's tokens; True when a stop string finished the sample before the core did."""
        p = group.request.params
        m = group.metrics
        if sample.index == 0:
            if out.first_scheduled_time is not None:
                m.first_scheduled_time = out.first_scheduled_time
            m.num_preemptions = out.num_preemptions
            if out.num_cached_tokens is not None:
                group.num_cached_tokens = out.num_cached_tokens
            if out.pooling_output is not None:
                group.pooling_output = out.pooling_output
            if out.prompt_logprobs is not None:
                prompt = group.request.prompt_token_ids
                group.prompt_logprobs = [None] + [self._logprob_dict(t, lp)
                                                  for t, lp in zip(prompt[1:], out.prompt_logprobs, strict=True)]
        last = len(out.new_token_ids) - 1
        for i, token in enumerate(out.new_token_ids):
            sample.token_ids.append(token)
            if sample.index == 0:
                if m.first_token_time is None:
                    m.first_token_time = now
                m.token_times.append(now)
            if out.new_logprobs is not None:
                sample.logprobs.append(self._logprob_dict(token, out.new_logprobs[i]))
            if i == last and out.finish_reason == "stop":
                break  # the core stopped on EOS or a stop token id: not part of the text
            stop_str = sample.detok.add_token(token, check_stop=len(sample.token_ids) > p.min_tokens)
            if stop_str is not None:
                self._finish(group, sample, "stop", stop_str, now)
                return not out.finished
        if out.finished:
            self._finish(group, sample, out.finish_reason, out.stop_reason, now)
        return False

    def _apply_beams(self, group: _Group, out: EngineCoreOutput, now: float) -> None:
        """A finished beam search: each beam is a sample, best first (the EOS token not in the text)."""
        m = group.metrics
        m.first_scheduled_time = out.first_scheduled_time
        m.first_token_time = m.first_token_time or now
        for sample, beam in zip(group.samples, out.beams, strict=False):
            ids = beam.token_ids
            sample.token_ids = list(ids)
            text_ids = ids[:-1] if beam.finish_reason == "stop" else ids
            for token in text_ids:
                sample.detok.add_token(token, check_stop=False)
            sample.cumulative_logprob = beam.cum_logprob
            self._finish(group, sample, beam.finish_reason, None, now)
        for sample in group.samples[len(out.beams):]:  # fewer beams than asked (a tiny vocabulary)
            self._finish(group, sample, out.finish_reason, None, now)
        group.samples = group.samples[:max(1, len(out.beams))]

    def _finish(self, group: _Group, sample: _Sample, reason: str, stop_reason: int | str | None,
                now: float) -> None:
        sample.finish_reason, sample.stop_reason = reason, stop_reason
        if sample.index == 0:
            group.metrics.finished_time = now

    def abort_request(self, request_id: str) -> tuple[RequestOutput, list[str]] | None:
        """Finish every unfinished sample as "abort": the final output, and the core ids to abort."""
        group = self._groups.get(request_id)
        if group is None:
            return None
        now = time.monotonic()
        core_ids = []
        for s in group.samples:
            if s.finish_reason is None:
                self._finish(group, s, "abort", None, now)
                core_ids.append(s.core_id)
        out = self._make_output(group)
        self._forget(group)
        return out, core_ids

    def _logprob_dict(self, token: int, logprob: RawLogprob) -> dict[int, Logprob]:
        chosen, top = logprob
        out = {tid: Logprob(lp, rank + 1, self.tokenizer.decode([tid])) for rank, (tid, lp) in enumerate(top)}
        if token not in out:
            out[token] = Logprob(chosen, None, self.tokenizer.decode([token]))
        return out

    def _make_output(self, group: _Group) -> RequestOutput:
        completions = []
        want_logprobs = group.request.params.logprobs is not None
        for s in group.samples:
            finished = s.finish_reason is not None
            completions.append(CompletionOutput(
                index=s.index, text=s.detok.text, token_ids=list(s.token_ids),
                logprobs=list(s.logprobs) if want_logprobs else None,
                finish_reason=s.finish_reason, stop_reason=s.stop_reason,
                text_delta=s.detok.release(finished), token_ids_delta=s.token_ids[s.emitted_tokens:],
                cumulative_logprob=s.cumulative_logprob))
            s.emitted_tokens = len(s.token_ids)
        r = group.request
        return RequestOutput(r.request_id, r.prompt, r.prompt_token_ids, completions, finished=group.finished,
                             metrics=group.metrics, num_cached_tokens=group.num_cached_tokens,
                             prompt_logprobs=group.prompt_logprobs, pooling_output=group.pooling_output)

    def _forget(self, group: _Group) -> None:
        self._groups.pop(group.request.request_id, None)
        for s in group.samples:
            self._by_core_id.pop(s.core_id, None)
