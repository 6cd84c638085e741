"""Latency and throughput math on recorded timelines: percentiles, TTFT, inter-token latency,
end-to-end latency, queue time, goodput under SLOs, and time-weighted step statistics.

Definitions (all per request, seconds):
  TTFT = first token − arrival;  ITL = gaps between consecutive deliveries of tokens;
  TPOT = (last token − first token) / (tokens − 1);  E2E = finish − arrival;  queue = first scheduled − arrival.
Tokens that arrive together (several accepted in one speculative step, or one streamed chunk) are one
delivery, as vLLM's benchmark counts a chunk: ITL is what a reader waits between updates, TPOT the
time per token. Without speculation every token is its own delivery and the two agree on average.
Throughput is over the run's duration (start → last finish); ITL percentiles pool every gap of every
request, as vLLM's benchmark does.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from pagedserve.bench import prefix_cache
from pagedserve.bench.records import RequestRecord, RunResult, StepSample

PERCENTILES = (50, 90, 95, 99)


def percentile(values: Sequence[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default); NaN for no values."""
    if not 0 <= q <= 100:
        raise ValueError(f"percentile q must be in [0, 100], got {q}")
    xs = sorted(values)
    if not xs:
        return math.nan
    pos = (len(xs) - 1) * q / 100
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else math.nan


def distribution(values: Sequence[float]) -> dict[str, float]:
    out = {"mean": mean(values), "min": min(values) if values else math.nan,
           "max": max(values) if values else math.nan}
    for q in PERCENTILES:
        out[f"p{q}"] = percentile(values, q)
    out["count"] = len(values)
    return out


# --- per request -----------------------------------------------------------------------------------


def ttft(r: RequestRecord) -> float | None:
    return None if r.first_token is None else r.first_token - r.arrival


def e2e(r: RequestRecord) -> float | None:
    return None if r.finish is None else r.finish - r.arrival


def queue_time(r: RequestRecord) -> float | None:
    return None if r.scheduled is None else r.scheduled - r.arrival


def itls(r: RequestRecord) -> list[float]:
    t = r.token_times
    return [b - a for a, b in zip(t, t[1:], strict=False) if b != a]


def tpot(r: RequestRecord) -> float | None:
    t = r.token_times
    return (t[-1] - t[0]) / (len(t) - 1) if len(t) > 1 else None


@dataclass(frozen=True)
class SLO:
    """Service-level objectives in seconds; None means unconstrained."""

    ttft: float | None = None
    itl: float | None = None  # on each request's mean inter-token latency (TPOT)
    e2e: float | None = None

    @property
    def active(self) -> bool:
        return any(v is not None for v in (self.ttft, self.itl, self.e2e))

    def met(self, r: RequestRecord) -> bool:
        if not r.ok:
            return False
        checks = ((self.ttft, ttft(r)), (self.itl, tpot(r)), (self.e2e, e2e(r)))
        return all(limit is None or (value is not None and value <= limit) for limit, value in checks)


def goodput(records: Sequence[RequestRecord], duration: float, slo: SLO) -> dict[str, float]:
    """Requests per second that finished within every SLO, and their share of all requests."""
    good = sum(slo.met(r) for r in records)
    return {"requests_per_s": good / duration if duration > 0 else math.nan,
            "fraction": good / len(records) if records else math.nan, "count": good}


# --- per step --------------------------------------------------------------------------------------


def time_weighted(steps: Sequence[StepSample], value) -> float:
    """Mean of value(step) weighted by each step's duration (a long step counts for longer)."""
    total = sum(s.duration for s in steps)
    if not steps:
        return math.nan
    if total <= 0:
        return mean([value(s) for s in steps])
    return sum(value(s) * s.duration for s in steps) / total


def step_stats(steps: Sequence[StepSample]) -> dict[str, float]:
    if not steps:
        return {}
    return {
        "num_steps": len(steps),
        "mean_batch_size": time_weighted(steps, lambda s: s.batch_size),
        "max_batch_size": max(s.batch_size for s in steps),
        "mean_tokens_per_step": mean([s.num_tokens for s in steps]),
        "mean_step_ms": 1000 * mean([s.duration for s in steps]),
        "kv_mean_allocated_blocks": time_weighted(steps, lambda s: s.kv_allocated_slots / s.block_size),
        "kv_peak_allocated_blocks": max(s.kv_allocated_slots for s in steps) / steps[0].block_size,
        "kv_mean_filled_blocks": time_weighted(steps, lambda s: s.kv_filled_slots / s.block_size),
        # Free blocks that still hold a cached prefix: reusable, but not in use (not in the above).
        "kv_mean_cached_blocks": time_weighted(steps, lambda s: s.kv_cached_blocks),
        "kv_peak_cached_blocks": max(s.kv_cached_blocks for s in steps),
        # Memory waste: share of allocated KV slots holding nothing, time-weighted over the run.
        "kv_waste": time_weighted(steps, lambda s: s.waste),
        "num_preempted": sum(s.num_preempted for s in steps),
    }


def by_template(records: Sequence[RequestRecord]) -> dict[str, dict]:
    """TTFT and the cached share of prompt tokens per template (per turn, for a chat workload), in
    the order the templates first appear."""
    groups: dict[str, list[RequestRecord]] = {}
    for r in records:
        groups.setdefault(r.template or "-", []).append(r)
    out = {}
    for name, rs in groups.items():
        done = [r for r in rs if r.ok]
        ttfts = [v for r in done if (v := ttft(r)) is not None]
        out[name] = {"count": len(rs), "completed": len(done), "ttft_p50": percentile(ttfts, 50),
                     "ttft_p95": percentile(ttfts, 95), "prompt_tokens_mean": mean([r.prompt_tokens or 0 for r in done]),
                     "cached_share": prefix_cache.cached_share(rs)}
    return out


def spec_decode_summary(run: RunResult) -> dict | None:
    """The run's speculative config and counters (acceptance rate, mean accepted length), or None without."""
    config = (run.config.get("engine") or {}).get("speculative_config")
    if not config and not run.spec_decode:
        return None
    return {"config": config, **(run.spec_decode or {})}


# --- a whole run ------------------------------------------------------------------------------------


def summarize(run: RunResult, slo: SLO | None = None) -> dict:
    done = [r for r in run.requests if r.ok]
    duration = run.duration
    out_tokens = sum(r.output_tokens for r in done)
    prompt_tokens = sum(r.prompt_tokens or 0 for r in done)
    mismatched = sum(r.output_tokens != r.max_tokens for r in done)
    summary = {
        "system": run.system,
        "requests": len(run.requests),
        "completed": len(done),
        "errors": len(run.requests) - len(done),
        "duration_s": duration,
        "output_tokens": out_tokens,
        "prompt_tokens": prompt_tokens,
        "output_tokens_not_max_tokens": mismatched,
        "request_throughput": len(done) / duration if duration > 0 else math.nan,
        "output_throughput": out_tokens / duration if duration > 0 else math.nan,
        "total_token_throughput": (out_tokens + prompt_tokens) / duration if duration > 0 else math.nan,
        "ttft": distribution([v for r in done if (v := ttft(r)) is not None]),
        "itl": distribution([g for r in done for g in itls(r)]),
        "tpot": distribution([v for r in done if (v := tpot(r)) is not None]),
        "e2e": distribution([v for r in done if (v := e2e(r)) is not None]),
        "queue": distribution([v for r in done if (v := queue_time(r)) is not None]),
        "steps": step_stats(run.steps),
        "prefix_cache": prefix_cache.summary(run),
        "spec_decode": spec_decode_summary(run),
        "by_template": by_template(run.requests),
    }
    if slo is not None and slo.active:
        summary["goodput"] = goodput(run.requests, duration, slo)
        summary["slo"] = {"ttft_s": slo.ttft, "itl_s": slo.itl, "e2e_s": slo.e2e}
    errors = [r.error for r in run.requests if r.error]
    if errors:
        summary["first_errors"] = errors[:5]
    return summary
