import pytest

from pagedserve.spec_decode.controller import EXPLORE_EVERY, Candidate, SpeculationController, StepCosts


def _controller(costs: dict[int, float], **kw) -> SpeculationController:
    c = SpeculationController(**kw)
    for rows, seconds in costs.items():
        c.observe_step(rows, seconds)
    c.next_step([])  # step 1: not an exploring step
    return c


def _accepting(c: SpeculationController, rid: str, proposed: int, accepted: int, times: int = 10) -> None:
    for _ in range(times):
        c.observe_request(rid, proposed, accepted)


def test_fixed_threshold():
    c = SpeculationController(disable_by_batch_size=8)
    cands = [Candidate("a", 4), Candidate("b", 2)]
    assert c.plan(7, cands, False) == {"a": 4, "b": 2}
    assert c.plan(8, cands, False) == {}


def test_nothing_measured_speculates_to_learn():
    c = SpeculationController()
    assert c.plan(4, [Candidate("a", 3), Candidate("b", 0)], False) == {"a": 3}


def test_step_costs_interpolate_and_scale_beyond_the_largest():
    t = StepCosts()
    assert t.estimate(3) is None
    t.observe(1, 0.010)
    t.observe(9, 0.020)
    assert t.estimate(5) == pytest.approx(0.015)
    assert t.estimate(18) == pytest.approx(0.040)  # per row as costly as at 9 rows
    assert t.estimate(1) == pytest.approx(0.010)
    t.observe(1, 0.020)  # a moving average, not the last sample
    assert 0.010 < t.estimate(1) < 0.020


def test_cheap_rows_and_good_drafts_speculate_costly_rows_do_not():
    cheap = _controller({1: 0.010, 5: 0.012})
    _accepting(cheap, "a", 4, 4)
    assert cheap.plan(1, [Candidate("a", 4)], False) == {"a": 4}
    costly = _controller({1: 0.010, 5: 0.050})  # every row costs what a whole step does
    _accepting(costly, "a", 4, 4)
    assert costly.plan(1, [Candidate("a", 4)], False) == {}


def test_drafts_go_to_the_requests_likely_to_accept_them():
    c = _controller({2: 0.010, 4: 0.0125, 6: 0.015})
    _accepting(c, "good", 4, 4)
    _accepting(c, "bad", 4, 0)
    plan = c.plan(2, [Candidate("good", 4), Candidate("bad", 4)], False)
    assert plan.get("good", 0) >= 2 and "bad" not in plan
    assert c.alpha("bad") < 0.2 < 0.8 < c.alpha("good")


def test_a_request_that_stopped_drafting_gets_another_chance():
    c = _controller({1: 0.010, 3: 0.014})  # a row costs a fifth of a step: a 10% draft does not pay
    _accepting(c, "other", 2, 2)
    _accepting(c, "r", 2, 0)
    assert c.plan(1, [Candidate("r", 2)], False) == {}
    for _ in range(40):  # its failures fade towards the engine-wide rate
        c.next_step(["r"])
    c._next_explore = c._step + 1  # (not an exploring step)
    assert c.plan(1, [Candidate("r", 2)], False).get("r", 0) >= 1
    c.forget(["r"])
    assert c.alpha("r") == pytest.approx(c.alpha("never-seen"))


def test_a_costly_draft_pass_turns_model_based_drafting_off():
    c = _controller({1: 0.010, 3: 0.011})
    _accepting(c, "a", 2, 2)
    assert c.plan(1, [Candidate("a", 2)], True) == {"a": 2}  # no pass measured yet
    c.observe_proposal(1, 2, 0.020)  # each draft pass costs a whole step
    assert c.plan(1, [Candidate("a", 2)], True) == {}
    assert c.plan(1, [Candidate("a", 2)], False) == {"a": 2}  # the same rows, proposed for free


def test_exploring_steps_plan_more_than_the_model_picked_and_grow_rarer_while_it_picks_none():
    c = _controller({1: 0.010, 5: 0.050})
    _accepting(c, "a", 4, 4)
    tried = []
    for step in range(EXPLORE_EVERY * 15):
        if c.plan(1, [Candidate("a", 4)], False):
            tried.append(step)
        c.next_step(["a"])
    gaps = [b - a for a, b in zip(tried, tried[1:], strict=False)]
    assert len(tried) == 4 and gaps == [2 * EXPLORE_EVERY, 4 * EXPLORE_EVERY, 8 * EXPLORE_EVERY]
