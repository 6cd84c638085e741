"""The continuous-vs-static gain figures, checked on hand-made step logs with a known cost per step."""

from __future__ import annotations

import math

import pytest

from pagedserve.bench.batch_gain import (
    DecodeStep,
    batching_gain,
    decode_steps,
    fit_step_cost,
    markdown,
    one_line,
)
from pagedserve.bench.records import StepSample


def steps(*batches: int, fixed_ms: float = 10.0, per_seq_ms: float = 1.0) -> list[DecodeStep]:
    return [DecodeStep(b, (fixed_ms + per_seq_ms * b) / 1000) for b in batches]


def test_fit_recovers_a_linear_step_cost():
    fixed, per_seq = fit_step_cost(steps(1, 2, 4, 8, 16, 16, fixed_ms=9.0, per_seq_ms=1.5))
    assert fixed == pytest.approx(9.0) and per_seq == pytest.approx(1.5)
    assert all(math.isnan(v) for v in fit_step_cost(steps(4, 4)))  # one batch size: no slope
    assert all(math.isnan(v) for v in fit_step_cost([]))


def test_gain_figures_by_hand():
    # Step cost 10 ms + 1 ms per sequence. Static: 16, 8, 4, 2 -> 70 ms for 30 tokens.
    # Continuous: 16, 16, 12 -> 74 ms for 44 tokens. Full steps (both runs): 3 x 26 ms for 48 tokens.
    g = batching_gain(steps(16, 8, 4, 2), steps(16, 16, 12), seats=16)
    assert g.static_ms_per_token == pytest.approx(70 / 30)
    assert g.continuous_ms_per_token == pytest.approx(74 / 44)
    assert g.full_ms_per_token == pytest.approx(78 / 48)
    assert g.ceiling == pytest.approx((70 / 30) / (78 / 48))
    assert g.achieved == pytest.approx((70 / 30) / (74 / 44))
    assert g.flat_cost_ceiling == pytest.approx(16 / 7.5)  # static's mean batch: 30 tokens / 4 steps
    assert g.fixed_ms == pytest.approx(10) and g.per_sequence_ms == pytest.approx(1)
    assert g.fixed_share_of_full_step == pytest.approx(10 / 26)
    assert g.achieved <= g.ceiling <= g.flat_cost_ceiling


def test_a_fixed_cost_machine_gains_seats_over_mean_batch():
    g = batching_gain(steps(16, 8, 4, 2, per_seq_ms=0.0), steps(16, 16, per_seq_ms=0.0), seats=16)
    assert g.ceiling == pytest.approx(g.flat_cost_ceiling) == pytest.approx(16 / 7.5)
    # ...and a machine whose steps cost only per sequence gains nothing from batching.
    g = batching_gain(steps(16, 8, 4, 2, fixed_ms=0.0), steps(16, 16, fixed_ms=0.0), seats=16)
    assert g.ceiling == pytest.approx(1.0) and g.achieved == pytest.approx(1.0)


def test_without_a_full_step_the_fit_stands_in():
    g = batching_gain(steps(8, 4, 2), steps(8, 6), seats=16)
    assert g.full_ms_per_token == pytest.approx(26 / 16)


def test_needs_both_policies():
    assert batching_gain([], steps(16), seats=16) is None
    assert batching_gain(steps(16), [], seats=16) is None


def test_decode_steps_drop_prefill_and_empty_steps():
    def sample(batch: int, prefill: int, duration: float) -> StepSample:
        return StepSample(t=0.0, duration=duration, batch_size=batch, num_tokens=batch, num_prefill=prefill,
                          kv_allocated_slots=0, kv_filled_slots=0, kv_capacity_slots=None, block_size=16)

    log = [sample(3, 1, 0.5), sample(3, 0, 0.02), sample(0, 0, 0.001)]
    assert decode_steps(log) == [DecodeStep(3, 0.02)]


def test_texts_carry_the_figures():
    g = batching_gain(steps(16, 8, 4, 2), steps(16, 16, 12), seats=16)
    md = markdown(g)
    assert f"**{g.achieved:.2f}x**" in md and f"**{g.ceiling:.2f}x**" in md and "10.0 ms + 1.00 ms" in md
    line = one_line(g.to_json())
    assert f"{g.ceiling:.2f}x" in line and f"{g.flat_cost_ceiling:.2f}x" in line


def test_one_batch_size_has_no_fit_but_still_a_ceiling():
    g = batching_gain(steps(16), steps(16), seats=16)
    assert g.ceiling == pytest.approx(1.0)
    assert "Too few batch sizes" in markdown(g)
    # Nothing to measure a full step by, and no fit to stand in: the ceiling is unknown, not made up.
    g = batching_gain(steps(8), steps(8), seats=16)
    assert math.isnan(g.full_ms_per_token) and math.isnan(g.ceiling)
    assert "nan" in one_line(g.to_json())
