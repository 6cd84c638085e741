from pagedserve.spec_decode.controller import EXPLORE_EVERY, MIN_SAMPLES, SpeculationController, batch_bucket


def test_fixed_threshold():
    c = SpeculationController(disable_by_batch_size=8)
    assert c.should_speculate(7) and not c.should_speculate(8)


def test_measured_arms_pick_the_faster_and_keep_exploring():
    c = SpeculationController()
    # Small batches: speculation emits more tokens per second; large: it costs more than it saves.
    for _ in range(MIN_SAMPLES):
        c.observe_step(1, True, 30, 0.1)
        c.observe_step(1, False, 10, 0.1)
        c.observe_step(64, True, 100, 0.5)
        c.observe_step(64, False, 64, 0.2)
    small = [c.should_speculate(1) for _ in range(EXPLORE_EVERY * 2)]
    large = [c.should_speculate(64) for _ in range(EXPLORE_EVERY * 2)]
    assert small.count(True) == len(small) - 2  # the other arm is tried once per EXPLORE_EVERY
    assert large.count(False) == len(large) - 2
    assert batch_bucket(33) == batch_bucket(64) != batch_bucket(32)


def test_an_untried_arm_is_tried_first():
    c = SpeculationController()
    assert c.should_speculate(4)  # nothing measured: speculation first
    for _ in range(MIN_SAMPLES):
        c.observe_step(4, True, 5, 0.1)
    assert not c.should_speculate(4)  # then plain decoding, until both arms have samples


def test_requests_whose_drafts_keep_failing_pause():
    c = SpeculationController()
    for _ in range(10):
        c.observe_request("r", 4, 0)
    assert not c.eligible("r")
    for _ in range(40):
        c.next_step()
    assert c.eligible("r")  # a new chance after the pause
    c.forget(["r"])
