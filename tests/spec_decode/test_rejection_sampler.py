"""The rejection sampler alone: whatever the proposal distribution q, accepted-or-resampled tokens are
distributed as the target p (Leviathan et al.), checked by a chi-square bound over many seeded draws."""

from __future__ import annotations

import pytest
import torch

from pagedserve.sample.rejection_sampler import accept_prefix, rejection_sample

V = 8
DRAWS = 6000
# Chi-square critical value for 7 degrees of freedom at p = 0.001 (a fixed seed keeps the test stable).
CHI2_CRIT = 24.32


def _dist(seed: int, peak: float = 1.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.softmax(torch.randn(V, generator=g) * peak, dim=0)


def _cases() -> dict[str, tuple[torch.Tensor, torch.Tensor | None]]:
    p = _dist(1)
    disjoint_p = torch.tensor([0.5, 0.3, 0.2, 0, 0, 0, 0, 0])
    disjoint_q = torch.tensor([0, 0, 0, 0.4, 0.3, 0.2, 0.1, 0])
    return {"random": (p, _dist(2)), "peaked": (p, _dist(3, peak=6.0)), "disjoint": (disjoint_p, disjoint_q),
            "q_equals_p": (p, p.clone()), "one_hot": (p, None)}


def _chi2(counts: torch.Tensor, p: torch.Tensor) -> float:
    expected = p * counts.sum()
    support = expected > 0
    assert counts[~support].sum() == 0, "a token outside the target's support was emitted"
    return float(((counts[support] - expected[support]) ** 2 / expected[support]).sum())


@pytest.mark.parametrize("case", list(_cases()))
def test_first_token_is_distributed_as_the_target(case):
    p, q = _cases()[case]
    g = torch.Generator().manual_seed(1234)
    counts = torch.zeros(V)
    accepted = 0
    for _ in range(DRAWS):
        draft = int(torch.multinomial(q, 1, generator=g)) if q is not None else 0  # one-hot: always token 0
        out = rejection_sample(torch.stack([p, p]), [draft], None if q is None else q[None], g)
        counts[out[0]] += 1
        accepted += len(out) == 2
    assert _chi2(counts, p) < CHI2_CRIT
    if case == "q_equals_p":
        assert accepted == DRAWS  # nothing to correct: every draft is accepted
    if case == "disjoint":
        assert accepted == 0


def test_bonus_token_after_all_accepted_follows_the_last_target():
    p0 = torch.tensor([1.0] + [0.0] * (V - 1))  # the draft (token 0) is always accepted
    p1 = _dist(5)
    g = torch.Generator().manual_seed(7)
    counts = torch.zeros(V)
    for _ in range(DRAWS):
        out = rejection_sample(torch.stack([p0, p1]), [0], None, g)
        assert out[0] == 0 and len(out) == 2
        counts[out[1]] += 1
    assert _chi2(counts, p1) < CHI2_CRIT


def test_accept_prefix_stops_at_the_first_disagreement():
    assert accept_prefix([5, 6, 7, 8], [5, 6, 7]) == [5, 6, 7, 8]  # all accepted, then the bonus
    assert accept_prefix([5, 9, 7, 8], [5, 6, 7]) == [5, 9]  # the target's own token replaces the draft
    assert accept_prefix([4, 6, 7, 8], [5, 6, 7]) == [4]
    assert accept_prefix([3], []) == [3]


def test_coupled_form_matches_the_general_rule_for_a_deterministic_proposer():
    """Target tokens drawn from p at every row, accepted while they equal the drafts: the first emitted
    token is distributed as p whatever the draft is."""
    p = _dist(9)
    g = torch.Generator().manual_seed(3)
    counts = torch.zeros(V)
    for _ in range(DRAWS):
        targets = torch.multinomial(torch.stack([p, p]), 1, generator=g).squeeze(1).tolist()
        counts[accept_prefix(targets, [int(p.argmax())])[0]] += 1
    assert _chi2(counts, p) < CHI2_CRIT
