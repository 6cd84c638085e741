"""Arrival processes: when each request of a workload reaches the system.

- all at once: every offset 0 (offline throughput);
- Poisson at `rate` requests/s: exponential gaps, seeded;
- fixed concurrency: a closed loop (a new request as soon as one of C in flight finishes), so the
  offsets are unused and the runners keep C requests outstanding instead.
"""

from __future__ import annotations

import math
import random


def all_at_once(n: int) -> list[float]:
    return [0.0] * n


def poisson(n: int, rate: float, seed: int = 0) -> list[float]:
    """Offsets (s) of a Poisson process: the first request at 0, then exponential gaps of mean 1/rate."""
    if not (rate > 0 and math.isfinite(rate)):
        raise ValueError(f"rate must be a finite number > 0 requests/s, got {rate!r}")
    rng = random.Random(seed)
    offsets, t = [], 0.0
    for i in range(n):
        if i:
            t += rng.expovariate(rate)
        offsets.append(t)
    return offsets


def describe(rate: float | None, concurrency: int | None, unit: str = "req/s") -> str:
    """`unit` is what the rate counts: requests, or conversations for a multi-turn workload."""
    if concurrency:
        return f"closed loop, concurrency {concurrency}"
    if rate is None or math.isinf(rate):
        return "all at once"
    return f"Poisson, {rate:g} {unit}"
