"""A run's prefix-cache hit rate, counted as vLLM counts it: prompt tokens served from the cache over
prompt tokens looked up (those of the admitted requests), over the whole run.

Sources, best first: for this engine in-process, its own counters (deltas over the run, so the
warm-up doesn't count); over HTTP, the responses' `usage.prompt_tokens_details.cached_tokens`
summed over their prompt tokens, else the server's /metrics counters. An engine run with caching
off has a hit rate of 0 by construction.
"""

from __future__ import annotations

from collections.abc import Sequence

from pagedserve.bench.records import RequestRecord, RunResult

NOT_REPORTED = "not reported"


def setting(run: RunResult) -> bool | None:
    """The engine's enable_prefix_caching for an engine run; None for other systems."""
    return ((run.config.get("engine") or {}).get("cache") or {}).get("enable_prefix_caching")


def _from_counters(run: RunResult) -> dict | None:
    c = run.prefix_cache or {}
    if not c.get("queries"):
        return None
    return {"queries": int(c["queries"]), "hits": int(c.get("hits") or 0), "source": c.get("source", "counters")}


def _from_requests(requests: Sequence[RequestRecord]) -> dict | None:
    known = [r for r in requests if r.cached_tokens is not None and r.prompt_tokens]
    if not known:
        return None
    return {"queries": sum(r.prompt_tokens for r in known), "hits": sum(r.cached_tokens for r in known),
            "source": "per-request cached tokens"}


def summary(run: RunResult) -> dict:
    """{"enabled", "queries", "hits", "hit_rate", "source"}; hit_rate is None when nothing reports it."""
    enabled = setting(run)
    order = (_from_requests, _from_counters) if run.kind == "openai" else (_from_counters, _from_requests)
    found = None
    for source in order:
        found = source(run.requests if source is _from_requests else run)
        if found is not None:
            break
    if found is None and enabled is False:
        queries = sum(r.prompt_tokens or 0 for r in run.requests)
        found = {"queries": queries, "hits": 0, "source": "caching off"}
    if found is None:
        return {"enabled": enabled, "queries": None, "hits": None, "hit_rate": None, "source": NOT_REPORTED}
    q, h = found["queries"], found["hits"]
    return {"enabled": enabled, **found, "hit_rate": h / q if q else 0.0}


def cached_share(requests: Sequence[RequestRecord]) -> float | None:
    """Cached prompt tokens over prompt tokens among `requests` that report both (per template, say)."""
    found = _from_requests(requests)
    return None if found is None else found["hits"] / found["queries"]


def setting_label(enabled: bool | None) -> str:
    return {True: "on", False: "off"}.get(enabled, "–")
