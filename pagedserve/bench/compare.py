"""The headline: one system against each other system, as the chapter states it — throughput, mean
and p95 latency, TTFT and total-time improvement in percent, and memory waste (and the prefix-cache
hit rate, where both report one) side by side in percentage points.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

DEFAULT_TARGET = "pagedserve-continuous"


@dataclass
class Row:
    metric: str
    unit: str
    target: float
    baseline: float
    higher_is_better: bool
    # Percent improvement of target over baseline; rows in "%" (waste, hit rate) give percentage points.
    improvement: float

    def as_dict(self) -> dict:
        return dict(self.__dict__)


def _improvement(target: float, baseline: float, higher_is_better: bool) -> float:
    if any(map(math.isnan, (target, baseline))) or baseline == 0:
        return math.nan
    return 100 * (target / baseline - 1) if higher_is_better else 100 * (1 - target / baseline)


def _row(metric: str, unit: str, t: float, b: float, higher: bool) -> Row:
    return Row(metric, unit, t, b, higher, _improvement(t, b, higher))


def compare(target: dict, baseline: dict) -> list[Row]:
    """Rows for `target` vs `baseline` (two summaries from metrics.summarize)."""
    rows = [
        _row("Throughput (output tokens/s)", "tok/s", target["output_throughput"], baseline["output_throughput"], True),
        _row("Request throughput", "req/s", target["request_throughput"], baseline["request_throughput"], True),
        _row("Mean latency (end-to-end)", "s", target["e2e"]["mean"], baseline["e2e"]["mean"], False),
        _row("P95 latency (end-to-end)", "s", target["e2e"]["p95"], baseline["e2e"]["p95"], False),
        _row("Mean time to first token", "s", target["ttft"]["mean"], baseline["ttft"]["mean"], False),
        _row("P50 time to first token", "s", target["ttft"].get("p50", math.nan), baseline["ttft"].get("p50", math.nan),
             False),
        _row("P95 time to first token", "s", target["ttft"]["p95"], baseline["ttft"]["p95"], False),
        _row("Mean inter-token latency", "s", target["itl"]["mean"], baseline["itl"]["mean"], False),
        _row("Total time", "s", target["duration_s"], baseline["duration_s"], False),
    ]
    ts, bs = target.get("steps") or {}, baseline.get("steps") or {}
    if "kv_waste" in ts and "kv_waste" in bs:
        w = Row("Memory waste (KV allocated but empty)", "%", 100 * ts["kv_waste"], 100 * bs["kv_waste"], False,
                100 * (bs["kv_waste"] - ts["kv_waste"]))  # percentage points saved
        rows.append(w)
        rows.append(_row("Peak KV blocks allocated", "blocks", ts["kv_peak_allocated_blocks"],
                         bs["kv_peak_allocated_blocks"], False))
        rows.append(_row("Mean KV blocks allocated", "blocks", ts.get("kv_mean_allocated_blocks", math.nan),
                         bs.get("kv_mean_allocated_blocks", math.nan), False))
    th = (target.get("prefix_cache") or {}).get("hit_rate")
    bh = (baseline.get("prefix_cache") or {}).get("hit_rate")
    if th is not None and bh is not None:
        rows.append(Row("Prefix-cache hit rate (prompt tokens)", "%", 100 * th, 100 * bh, True, 100 * (th - bh)))
    if "goodput" in target and "goodput" in baseline:
        rows.append(_row("Goodput (requests/s within SLO)", "req/s", target["goodput"]["requests_per_s"],
                         baseline["goodput"]["requests_per_s"], True))
    return rows


def pick_target(summaries: list[dict], target: str | None = None) -> str:
    names = [s["system"] for s in summaries]
    if target and target in names:
        return target
    return DEFAULT_TARGET if DEFAULT_TARGET in names else names[0]


def headline(summaries: list[dict], target: str | None = None) -> list[dict]:
    """The target system against every other one: [{"target", "baseline", "rows": [...]}, ...]."""
    if len(summaries) < 2:
        return []
    name = pick_target(summaries, target)
    t = next(s for s in summaries if s["system"] == name)
    return [{"target": name, "baseline": s["system"], "rows": [r.as_dict() for r in compare(t, s)]}
            for s in summaries if s["system"] != name and s["completed"] and t["completed"]]
