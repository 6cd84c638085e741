"""The autoscaling policy on synthetic metric series: it scales up when the queue grows (after the
up delay), does not flap on a load that dips, scales down only after the down delay, never below what
in-flight requests need, and stays within [min, max]."""

from __future__ import annotations

import pytest

from pagedserve.serving.autoscaler import AutoscalerConfig, AutoscalerPolicy, ScaleInputs, p95


def _policy(**kw) -> AutoscalerPolicy:
    base = dict(min_replicas=1, max_replicas=4, target_queue_per_replica=2.0, upscale_delay_s=3.0,
                downscale_delay_s=10.0, max_in_flight_per_replica=8)
    return AutoscalerPolicy(AutoscalerConfig(**{**base, **kw}))


def _replay(policy: AutoscalerPolicy, series: list[tuple[float, float]], start: int = 1,
            in_flight: int = 0) -> list[int]:
    """Feed (time, total waiting) samples; the replica count follows each decision. Returns the counts."""
    current, counts = start, []
    for t, waiting in series:
        d = policy.decide(t, ScaleInputs(current, waiting, 0.1, in_flight))
        current = d.desired
        counts.append(current)
    return counts


def test_scales_up_on_queue_growth_after_the_delay():
    counts = _replay(_policy(), [(t, 6.0) for t in range(6)])  # 6 waiting on 1 replica: 3x the target
    assert counts[:3] == [1, 1, 1]  # the wish must hold 3 s
    assert counts[3] == 3  # ceil(1 * 6 / 2)
    d = _policy(upscale_delay_s=0).decide(0, ScaleInputs(1, 6.0, 0.1, 0))
    assert d.direction == "up" and d.signal == "queue" and "queue" in d.reason


def test_no_flapping_on_a_load_that_dips():
    # Busy, then a short lull (shorter than the down delay), then busy again: never scales down.
    series = [(t, 8.0 if (t < 20 or t > 26) else 0.0) for t in range(40)]
    counts = _replay(_policy(), series, start=4)
    assert counts == [4] * 40


def test_scales_down_after_the_delay_to_the_largest_recent_wish():
    series = [(float(t), 0.0 if t < 5 else 3.0) for t in range(12)]  # 2 → 2 replicas' worth, 3 waiting
    counts = _replay(_policy(), series, start=4)
    assert counts == [4] * 10 + [2, 2]  # at 10 s: max(wished) over the window = ceil(4 * 3/4 / 2) = 2


def test_never_below_what_in_flight_requests_need():
    counts = _replay(_policy(downscale_delay_s=0), [(float(t), 0.0) for t in range(3)], start=4, in_flight=20)
    assert counts == [3, 3, 3]  # ceil(20 / 8) replicas for 20 requests at 8 each
    d = _policy(upscale_delay_s=0).decide(0, ScaleInputs(1, 0.0, 0.1, 30))
    assert (d.desired, d.signal) == (4, "floor")


def test_respects_min_and_max():
    assert _replay(_policy(upscale_delay_s=0), [(0.0, 100.0)])[-1] == 4
    assert _replay(_policy(min_replicas=2, downscale_delay_s=0), [(0.0, 0.0)], start=3)[-1] == 2
    with pytest.raises(ValueError, match="max_replicas"):
        AutoscalerConfig(min_replicas=3, max_replicas=2).validate()


def test_latency_and_kv_usage_are_signals_too():
    p = _policy(upscale_delay_s=0, target_p95_s=1.0)
    d = p.decide(0, ScaleInputs(2, 0.0, 0.1, 0, p95_latency_s=3.0))
    assert (d.desired, d.signal) == (4, "p95")
    d = _policy(upscale_delay_s=0).decide(0, ScaleInputs(1, 0.0, 0.99 * 2, 0))
    assert d.signal == "kv_usage" and d.desired == 3
    assert p95([float(i) for i in range(1, 101)]) == 95.0 and p95([]) is None


def test_no_second_scale_up_while_replicas_are_starting():
    p = _policy(upscale_delay_s=0, max_replicas=8)
    d = p.decide(0, ScaleInputs(2, 20.0, 0.1, 0, starting=1))
    assert d.direction == "hold" and "starting" in d.reason
    assert p.decide(1, ScaleInputs(2, 20.0, 0.1, 0)).desired == 8
