from pagedserve.spec_decode.ngram import NgramProposer


def test_longest_match_proposes_its_continuation():
    prop = NgramProposer(3, 1, 4)
    ctx = [1, 2, 3, 4, 5, 9, 9, 2, 3, 4, 7, 2, 3, 4]
    # The tail [2, 3, 4] occurs twice before; the most recent occurrence (followed by 7, 2, 3) wins.
    assert prop.lookup("r", ctx, 3) == [7, 2, 3]
    assert prop.lookup("r", ctx + [5], 3) == [9, 9, 2]  # now [3, 4, 5] matches at the start


def test_no_match_and_limits():
    prop = NgramProposer(4, 2, 3)
    assert prop.lookup("a", [1, 2, 3, 4], 4) == []  # no earlier [3, 4]
    assert prop.lookup("b", [7, 8, 1, 7, 8], 4) == [1, 7, 8]  # continuation runs into the tail
    assert prop.lookup("c", [7, 8, 1, 7, 8], 1) == [1]  # max_tokens caps it
    assert prop.lookup("d", [7, 8, 1, 7, 8], 0) == []


def test_matches_never_straddle_token_boundaries():
    """Token ids whose bytes line up across a boundary must not match: 256 = 00 01 00 00 and 1 = 01 00 00 00."""
    prop = NgramProposer(2, 1, 1)
    ctx = [256, 0, 5, 1]  # bytes of 256, 0 contain 01 00 00 00 at offset 1 (unaligned)
    assert prop.lookup("r", ctx, 2) == []
    assert prop.lookup("s", [1, 6, 8, 1], 2) == [6, 8]


def test_buffers_grow_incrementally_and_reset():
    prop = NgramProposer(2, 1, 2)
    ctx = [4, 5, 6]
    assert prop.lookup("r", ctx, 2) == []
    ctx += [4]
    assert prop.lookup("r", ctx, 2) == [5, 6]
    assert prop.lookup("r", [9, 9], 2) == [9]  # a shorter context (another request, same id) starts over
    prop.forget(["r"])
    assert "r" not in prop._buffers
