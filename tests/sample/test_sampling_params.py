import pytest

from pagedserve import SamplingParams


@pytest.mark.parametrize("field,value", [
    ("temperature", -0.1), ("temperature", "hot"), ("top_p", 0.0), ("top_p", 1.5), ("top_k", 0),
    ("top_k", -2), ("min_p", 1.5), ("repetition_penalty", 0.0), ("presence_penalty", 3.0),
    ("frequency_penalty", -2.5), ("max_tokens", 0), ("min_tokens", -1), ("n", 0), ("n", 1000),
    ("logprobs", 50), ("seed", 1.5), ("stop", [""]), ("stop_token_ids", [-1]),
])
def test_invalid_values_name_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**{field: value})


def test_min_tokens_above_max_tokens_is_refused():
    with pytest.raises(ValueError, match="min_tokens"):
        SamplingParams(max_tokens=4, min_tokens=5)


def test_stop_string_is_normalised_to_list():
    p = SamplingParams(stop="###", temperature=0)
    assert p.stop == ["###"] and p.greedy and not p.needs_penalties


@pytest.mark.parametrize("bias", [{1: 100.5}, {1: -101}, {-1: 5.0}, {"1": 5.0}, {1: "x"}, [1, 2]])
def test_logit_bias_out_of_range_names_the_field(bias):
    with pytest.raises(ValueError, match="logit_bias"):
        SamplingParams(logit_bias=bias)


def test_logit_bias_in_range_is_kept():
    assert SamplingParams(logit_bias={3: 100, 4: -100.0}).logit_bias == {3: 100, 4: -100.0}
    assert SamplingParams(logit_bias={}).logit_bias is None
