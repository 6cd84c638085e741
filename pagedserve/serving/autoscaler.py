"""The autoscaling policy: replica metrics in, a desired replica count out, with its reason.

Each signal is compared with its target as a ratio (queue depth per replica against
`target_queue_per_replica`, p95 latency against `target_p95_s`, mean KV usage against
`target_kv_usage`); the largest ratio r says how many replicas the load needs, ceil(current * r),
as Kubernetes' HPA and Knative compute it. Within `tolerance` of 1 nothing changes. The count never
goes below what the requests in flight need (`max_in_flight_per_replica` each), nor outside
[min_replicas, max_replicas].

Hysteresis: a scale-up happens only after the wish to grow has held for `upscale_delay_s` (and not
while replicas started before are still coming up), a
scale-down only after the wish to shrink has held for `downscale_delay_s`, and a scale-down goes to
the largest count wished for during that window, so a load that dips for a moment does not make the
replica count flap.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass
class AutoscalerConfig:
    min_replicas: int = 1
    max_replicas: int = 4
    target_queue_per_replica: float = 2.0  # vllm:num_requests_waiting per replica
    target_p95_s: float | None = None  # p95 request latency; None: not a signal
    target_kv_usage: float = 0.9  # vllm:kv_cache_usage_perc, mean over replicas
    target_ongoing_per_replica: float | None = None  # router requests in flight per replica (Ray Serve's
    # target_ongoing_requests); None: not a signal
    max_in_flight_per_replica: int = 64  # the floor: ceil(in flight / this) replicas at least
    upscale_delay_s: float = 5.0
    downscale_delay_s: float = 30.0
    tolerance: float = 0.1

    def validate(self) -> None:
        if self.min_replicas < 1 or self.max_replicas < self.min_replicas:
            raise ValueError(f"min_replicas must be >= 1 and max_replicas >= min_replicas, got "
                             f"{self.min_replicas} and {self.max_replicas}")
        if self.target_queue_per_replica <= 0 or not 0 < self.target_kv_usage <= 1:
            raise ValueError("target_queue_per_replica must be > 0 and target_kv_usage in (0, 1]")
        if self.target_ongoing_per_replica is not None and self.target_ongoing_per_replica <= 0:
            raise ValueError(f"target_ongoing_per_replica must be > 0, got {self.target_ongoing_per_replica}")
        if self.target_p95_s is not None and self.target_p95_s <= 0:
            raise ValueError(f"target_p95_s must be > 0, got {self.target_p95_s}")
        if self.upscale_delay_s < 0 or self.downscale_delay_s < 0:
            raise ValueError("upscale_delay_s and downscale_delay_s must be >= 0")
        if self.max_in_flight_per_replica < 1:
            raise ValueError(f"max_in_flight_per_replica must be >= 1, got {self.max_in_flight_per_replica}")


@dataclass
class ScaleInputs:
    """What the policy sees at one tick."""

    current: int  # replicas serving or starting (draining ones excluded)
    num_waiting: float  # summed over replicas
    kv_usage: float  # mean over replicas
    in_flight: int  # requests the router has at replicas
    p95_latency_s: float | None = None  # over the recent window; None: no requests in it
    starting: int = 0  # of `current`, replicas not serving yet


@dataclass
class Decision:
    desired: int
    direction: str  # "up" | "down" | "hold"
    reason: str  # in words, for the log
    signal: str = ""  # what drove it: queue, kv_usage, p95, in_flight, floor (the metric's label)


class AutoscalerPolicy:
    def __init__(self, config: AutoscalerConfig) -> None:
        config.validate()
        self.config = config
        self._up_since: float | None = None
        self._down_since: float | None = None
        self._down_max = 0  # the largest count wished for since _down_since

    def recommend(self, m: ScaleInputs) -> tuple[int, str, str]:
        """The count the load needs now (no delays), the signal that drove it, and why."""
        c = self.config
        cur = max(m.current, 1)
        ratios = {"queue": (m.num_waiting / cur) / c.target_queue_per_replica,
                  "kv_usage": m.kv_usage / c.target_kv_usage}
        if c.target_ongoing_per_replica is not None:
            ratios["in_flight"] = (m.in_flight / cur) / c.target_ongoing_per_replica
        if c.target_p95_s is not None and m.p95_latency_s is not None:
            ratios["p95"] = m.p95_latency_s / c.target_p95_s
        signal, ratio = max(ratios.items(), key=lambda kv: kv[1])
        if abs(ratio - 1.0) <= c.tolerance:
            want, why = m.current, f"{signal} at {ratio:.2f}x its target (within tolerance)"
        else:
            want, why = math.ceil(m.current * ratio - 1e-9), f"{signal} at {ratio:.2f}x its target"
        floor = math.ceil(m.in_flight / c.max_in_flight_per_replica)
        if floor > want:
            want, why, signal = floor, f"{m.in_flight} requests in flight need {floor} replicas", "floor"
        bounded = min(max(want, c.min_replicas), c.max_replicas)
        if bounded != want:
            why += f" (bounded to [{c.min_replicas}, {c.max_replicas}])"
        return bounded, signal, why

    def decide(self, now: float, m: ScaleInputs) -> Decision:
        want, signal, why = self.recommend(m)
        c = self.config
        if want > m.current:
            self._down_since = None
            if m.starting:  # their capacity is on its way: judge the load once they serve
                self._up_since = None
                return Decision(m.current, "hold", f"{why}; {m.starting} replicas still starting", signal)
            if self._up_since is None:
                self._up_since = now
            if now - self._up_since >= c.upscale_delay_s:
                self._up_since = None
                return Decision(want, "up", why, signal)
            return Decision(m.current, "hold", f"{why}; up after {c.upscale_delay_s:g} s", signal)
        self._up_since = None
        if want < m.current:
            if self._down_since is None:
                self._down_since, self._down_max = now, want
            self._down_max = max(self._down_max, want)
            if now - self._down_since >= c.downscale_delay_s:
                target = self._down_max
                self._down_since = None
                return Decision(target, "down", f"{why}; wished for at most {target} over "
                                                f"{c.downscale_delay_s:g} s", signal)
            return Decision(m.current, "hold", f"{why}; down after {c.downscale_delay_s:g} s", signal)
        self._down_since = None
        return Decision(m.current, "hold", why, signal)


def p95(values: list[float]) -> float | None:
    if not values:
        return None
    s = sorted(values)
    return s[min(len(s) - 1, math.ceil(0.95 * len(s)) - 1)]
