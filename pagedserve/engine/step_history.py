"""The engine's recent history, one bucket per second, for the live page's charts.

A step observer of the engine core: every step adds its figures to the current second's bucket
(steps, sequences, scheduled and output tokens, queue depth, KV usage, preemptions, prefix-cache
lookups and hits, speculative tokens, TTFTs and inter-token gaps). Buckets of the last `window`
seconds are kept, one per second: a second in which no step ended carries the gauges on while the
engine is busy (a step may take longer than a second) and is zeros when it is idle, so the charts'
time axis has no holes. Rates are averaged over a few seconds and percentiles taken over ten, for
the same reason. The cost is a few additions per step and a dict update per scheduled request.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from pagedserve.core.sched.output import SchedulerOutput
from pagedserve.engine.core_messages import EngineCoreOutputs

WINDOW_S = 300  # five minutes of history


def percentile(values: list[float], q: float) -> float | None:
    """The q-quantile (0..1) by nearest rank of the sorted values; None when there are none."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


RATE_WINDOW = 5  # seconds a rate (tokens/s) is averaged over: steps longer than a second leave empty ones
LATENCY_WINDOW = 10  # seconds of TTFTs, gaps and prefix lookups behind each percentile and hit rate


@dataclass
class _Bucket:
    second: int  # Unix time, whole seconds
    steps: int = 0
    busy_s: float = 0.0  # time inside steps
    seqs: int = 0  # sum over steps of the batch size
    tokens: int = 0  # scheduled tokens (prefill + decode + drafts)
    prefill_tokens: int = 0
    output_tokens: int = 0
    waiting: int = 0  # gauges at the bucket's last step (carried into seconds without a step end)
    kv_usage: float = 0.0
    batch: float = 0.0
    tokens_per_step: float = 0.0
    preemptions: int = 0
    prefix_queries: int = 0
    prefix_hits: int = 0
    spec_drafted: int = 0
    spec_accepted: int = 0
    ttfts: list[float] = field(default_factory=list)
    itls: list[float] = field(default_factory=list)


def _row(window: list[_Bucket]) -> list[Any]:
    """The last bucket of `window` as a series row (see SERIES): gauges as they were, rates over the last
    RATE_WINDOW seconds, percentiles and ratios over the whole window."""
    b = window[-1]
    recent = window[-RATE_WINDOW:]
    ttfts = [v for w in window for v in w.ttfts]
    itls = [v for w in window for v in w.itls]
    queries = sum(w.prefix_queries for w in window)
    drafted = sum(w.spec_drafted for w in window)

    def ms(seconds: float | None) -> float | None:
        return None if seconds is None else round(seconds * 1e3, 1)

    return [b.second, round(sum(w.output_tokens for w in recent) / len(recent), 1), round(b.batch, 2),
            round(b.tokens_per_step, 2), b.waiting, round(b.kv_usage, 4), b.preemptions,
            round(sum(w.prefix_hits for w in window) / queries, 4) if queries else None,
            round(sum(w.spec_accepted for w in window) / drafted, 4) if drafted else None,
            ms(percentile(ttfts, 0.5)), ms(percentile(ttfts, 0.95)), ms(percentile(itls, 0.5)),
            ms(percentile(itls, 0.95)), b.steps, round(b.busy_s, 3), b.prefill_tokens]


# Column names of `StepHistory.series()` rows, in order.
SERIES = ["t", "output_tokens_per_s", "batch_size", "tokens_per_step", "queue_depth", "kv_usage", "preemptions",
          "prefix_hit_rate", "spec_acceptance", "ttft_p50_ms", "ttft_p95_ms", "itl_p50_ms", "itl_p95_ms",
          "steps", "busy_s", "prefill_tokens"]


class StepHistory:
    def __init__(self, core: Any, window_s: int = WINDOW_S) -> None:
        self.core = core  # read after each step: the waiting queue, the pool, cumulative counters
        self._buckets: deque[_Bucket] = deque(maxlen=window_s)
        self._last_token: dict[str, float] = {}  # request id → when it last got tokens (for gaps)
        self._rows: dict[int, list[Any]] = {}  # rows of seconds that are over
        self._unix_offset = time.time() - time.monotonic()
        self._counters = self._read_counters()

    def _read_counters(self) -> tuple[int, int, int, int, int]:
        core = self.core
        ps = core.kv.prefix_stats
        spec = core.runner.speculator.stats if core.runner.speculator is not None else None
        return (core.scheduler.num_preemptions, ps.queries, ps.hits,
                spec.num_draft_tokens if spec else 0, spec.num_accepted_tokens if spec else 0)

    def _bucket(self, mono: float) -> _Bucket:
        """The bucket of `mono`'s second, after a bucket for every second since the last one: those carry
        the gauges on while a step is running, and are zeros when the engine is idle."""
        second = int(mono + self._unix_offset)
        if not self._buckets:
            self._buckets.append(_Bucket(second))
        last = self._buckets[-1]
        busy = self.core.scheduler.has_unfinished()
        for s in range(max(last.second + 1, second - self._buckets.maxlen + 1), second + 1):
            b = _Bucket(s)
            if busy:
                b.waiting, b.kv_usage, b.batch, b.tokens_per_step = (last.waiting, last.kv_usage, last.batch,
                                                                     last.tokens_per_step)
            self._buckets.append(b)
        return self._buckets[-1]

    # --- the core's step observer ------------------------------------------------------------------

    def on_schedule(self, sched: SchedulerOutput, now: float) -> None:
        pass

    def on_step(self, sched: SchedulerOutput, outputs: EngineCoreOutputs, start: float, end: float) -> None:
        b = self._bucket(end)
        b.steps += 1
        b.busy_s += end - start
        b.seqs += len(sched.scheduled)
        b.tokens += sched.num_tokens
        b.batch = b.seqs / b.steps
        b.tokens_per_step = b.tokens / b.steps
        requests = {s.request.request_id: s.request for s in sched.scheduled}
        for out in outputs.outputs:
            n = len(out.new_token_ids)
            b.output_tokens += n
            if n:
                last = self._last_token.get(out.request_id)
                if last is None:
                    req = requests.get(out.request_id)
                    if req is not None and len(req.output_token_ids) <= n:  # its first tokens
                        b.ttfts.append(end - req.arrival_time)
                else:
                    b.itls.append(end - last)
                self._last_token[out.request_id] = end
            if out.finished:
                self._last_token.pop(out.request_id, None)
        b.prefill_tokens += sum(s.num_new_tokens for s in sched.scheduled if s.num_new_tokens > 1 + s.num_spec_tokens)
        core = self.core
        b.waiting = len(core.scheduler.waiting)
        pool = core.kv.pool
        b.kv_usage = (pool.num_blocks - pool.num_free) / pool.num_blocks
        counters = self._read_counters()
        deltas = [now - before for now, before in zip(counters, self._counters, strict=True)]
        self._counters = counters
        b.preemptions += deltas[0]
        b.prefix_queries += deltas[1]
        b.prefix_hits += deltas[2]
        b.spec_drafted += deltas[3]
        b.spec_accepted += deltas[4]

    def on_abort(self, request_ids: list[str], now: float) -> None:
        for rid in request_ids:
            self._last_token.pop(rid, None)

    # --- what the page reads -------------------------------------------------------------------

    def series(self) -> list[list[Any]]:
        """One row per second of the window, up to now (SERIES names the columns). A second's row is
        computed once it is over; only the current one is recomputed at each call."""
        self._bucket(time.monotonic())
        buckets = list(self._buckets)
        first = buckets[0].second
        for second in [s for s in self._rows if s < first]:
            del self._rows[second]
        rows = []
        for i, b in enumerate(buckets):
            row = self._rows.get(b.second)
            if row is None:
                row = _row(buckets[max(0, i - LATENCY_WINDOW + 1):i + 1])
                if i < len(buckets) - 1:
                    self._rows[b.second] = row
            rows.append(row)
        return rows
