"""Metrics math on hand-made timelines: percentiles, TTFT, ITL, E2E, queue, goodput, step stats, headline."""

from __future__ import annotations

import math

import numpy as np
import pytest

from pagedserve.bench import compare, metrics
from pagedserve.bench.metrics import SLO, percentile
from pagedserve.bench.records import RequestRecord, RunResult, StepSample


def test_percentile_matches_linear_interpolation():
    assert percentile([1, 2, 3, 4], 50) == 2.5
    assert percentile([4, 1, 3, 2], 0) == 1
    assert percentile([4, 1, 3, 2], 100) == 4
    assert percentile([7.0], 95) == 7.0
    assert math.isnan(percentile([], 50))
    rng = np.random.default_rng(0)
    for n in (2, 5, 17, 100):
        xs = rng.exponential(size=n).tolist()
        for q in (1, 25, 50, 90, 95, 99):
            assert percentile(xs, q) == pytest.approx(float(np.percentile(xs, q)))
    with pytest.raises(ValueError):
        percentile([1.0], 101)


def _rec(rid, arrival, scheduled, times, max_tokens=None, error=None) -> RequestRecord:
    return RequestRecord(rid, arrival, max_tokens or len(times), scheduled=scheduled,
                         first_token=times[0] if times else None, token_times=list(times),
                         finish=times[-1] if times else None, output_tokens=len(times), prompt_tokens=10, error=error)


A = _rec("a", 1.0, 1.5, [2.0, 2.1, 2.3, 2.6])
B = _rec("b", 0.0, 0.0, [0.5, 1.5])


def test_per_request_latencies():
    assert metrics.ttft(A) == pytest.approx(1.0)
    assert metrics.itls(A) == pytest.approx([0.1, 0.2, 0.3])
    assert metrics.tpot(A) == pytest.approx(0.2)
    assert metrics.e2e(A) == pytest.approx(1.6)
    assert metrics.queue_time(A) == pytest.approx(0.5)
    one = _rec("c", 0.0, 0.0, [0.4])
    assert metrics.itls(one) == [] and metrics.tpot(one) is None


def test_tokens_delivered_together_are_one_gap_but_count_in_tpot():
    # A speculative step that accepts two drafts delivers three tokens at once.
    spec = _rec("s", 0.0, 0.0, [1.0, 1.0, 1.0, 1.4, 2.0, 2.0])
    assert metrics.itls(spec) == pytest.approx([0.4, 0.6])
    assert metrics.tpot(spec) == pytest.approx(1.0 / 5)


def test_goodput_counts_requests_within_every_slo():
    failed = _rec("c", 0.0, None, [], max_tokens=5, error="HTTP 429")
    slo = SLO(ttft=1.0, itl=0.25)
    assert slo.met(A)  # ttft 1.0 <= 1.0, tpot 0.2 <= 0.25
    assert not slo.met(B)  # tpot 1.0
    assert not slo.met(failed)
    g = metrics.goodput([A, B, failed], duration=4.0, slo=slo)
    assert g == {"requests_per_s": 0.25, "fraction": pytest.approx(1 / 3), "count": 1}
    assert metrics.goodput([A, B], 4.0, SLO(e2e=1.0))["count"] == 0
    assert not SLO().active and SLO(itl=0.1).active


def test_summarize_a_run():
    failed = _rec("c", 0.0, None, [], max_tokens=5, error="refused")
    steps = [StepSample(t=0.0, duration=1.0, batch_size=2, num_tokens=20, num_prefill=2, kv_allocated_slots=32,
                        kv_filled_slots=16, kv_capacity_slots=64, block_size=16),
             StepSample(t=1.0, duration=3.0, batch_size=1, num_tokens=1, num_prefill=0, kv_allocated_slots=32,
                        kv_filled_slots=24, kv_capacity_slots=64, block_size=16, num_preempted=1)]
    run = RunResult("sys", "engine", {}, [A, B, failed], steps, duration=4.0)
    s = metrics.summarize(run, SLO(ttft=1.0))
    assert (s["requests"], s["completed"], s["errors"]) == (3, 2, 1)
    assert s["output_tokens"] == 6 and s["prompt_tokens"] == 20
    assert s["request_throughput"] == pytest.approx(0.5)
    assert s["output_throughput"] == pytest.approx(1.5)
    assert s["total_token_throughput"] == pytest.approx(26 / 4)
    assert s["ttft"]["mean"] == pytest.approx(0.75) and s["ttft"]["count"] == 2
    assert s["itl"]["count"] == 4  # gaps pooled over requests: 3 + 1
    assert s["itl"]["mean"] == pytest.approx((0.1 + 0.2 + 0.3 + 1.0) / 4)
    assert s["e2e"]["p50"] == pytest.approx((1.6 + 1.5) / 2)
    assert s["queue"]["mean"] == pytest.approx(0.25)
    st = s["steps"]
    assert st["mean_batch_size"] == pytest.approx((2 * 1 + 1 * 3) / 4)  # time-weighted
    assert st["kv_waste"] == pytest.approx((0.5 * 1 + 0.25 * 3) / 4)
    assert st["kv_peak_allocated_blocks"] == 2 and st["num_preempted"] == 1
    assert s["goodput"]["count"] == 2
    assert s["first_errors"] == ["refused"]


def test_step_waste():
    s = StepSample(0, 1, 1, 1, 0, kv_allocated_slots=48, kv_filled_slots=12, kv_capacity_slots=None, block_size=16)
    assert s.waste == pytest.approx(0.75)
    assert StepSample(0, 1, 0, 0, 0, 0, 0, None, 16).waste == 0.0


def _summary(name, tok_s, e2e_mean, e2e_p95, duration, waste):
    d = {"mean": e2e_mean, "p95": e2e_p95}
    return {"system": name, "completed": 10, "output_throughput": tok_s, "request_throughput": tok_s / 100,
            "e2e": d, "ttft": d, "itl": d, "duration_s": duration,
            "steps": {"kv_waste": waste, "kv_peak_allocated_blocks": 10}}


def test_headline_improvements():
    cont = _summary("pagedserve-continuous", 150.0, 1.0, 2.0, 10.0, 0.05)
    stat = _summary("pagedserve-static", 100.0, 2.0, 5.0, 20.0, 0.45)
    (h,) = compare.headline([stat, cont])
    assert (h["target"], h["baseline"]) == ("pagedserve-continuous", "pagedserve-static")
    rows = {r["metric"]: r for r in h["rows"]}
    assert rows["Throughput (output tokens/s)"]["improvement"] == pytest.approx(50.0)
    assert rows["Mean latency (end-to-end)"]["improvement"] == pytest.approx(50.0)
    assert rows["P95 latency (end-to-end)"]["improvement"] == pytest.approx(60.0)
    assert rows["Total time"]["improvement"] == pytest.approx(50.0)
    assert rows["Memory waste (KV allocated but empty)"]["improvement"] == pytest.approx(40.0)  # points
    assert compare.headline([cont]) == []


def test_contention_note():
    from pagedserve.bench.contention import Contention, note_if_disturbed

    assert note_if_disturbed({"wait_share": 0.05}) is None
    assert note_if_disturbed({}) is None
    note = note_if_disturbed({"wait_share": 0.5, "loadavg_1m_start": 3.0, "loadavg_1m_end": None})
    assert "50%" in note and "rerun" in note
    stats = Contention().result()
    assert stats["wall_s"] >= 0 and "loadavg_1m_start" in stats
