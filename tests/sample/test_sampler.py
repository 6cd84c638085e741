"""The sampler's empirical frequencies match the exact target distribution for a fixed logits vector."""

from __future__ import annotations

import math

import pytest
import torch

from pagedserve.core.request import Request
from pagedserve.kernels import cpu_ops
from pagedserve.sample.sampler import Sampler
from pagedserve.sampling_params import SamplingParams

LOGITS = torch.tensor([2.0, 1.5, 1.2, 1.0, 0.5, 0.0, -0.5, -1.0, -2.0, -3.0])
DRAWS = 20000


def reference(logits: torch.Tensor, p: SamplingParams, prompt: list[int], output: list[int]) -> torch.Tensor:
    """The exact target distribution, written the slow and obvious way."""
    x = logits.double().clone()
    for t in set(prompt) | set(output):
        if p.repetition_penalty != 1.0:
            x[t] = x[t] / p.repetition_penalty if x[t] > 0 else x[t] * p.repetition_penalty
    for t in set(output):
        x[t] -= p.presence_penalty + p.frequency_penalty * output.count(t)
    x = x / p.temperature
    probs = torch.softmax(x, 0)
    order = sorted(range(len(x)), key=lambda i: -x[i].item())
    keep = set(order[: p.top_k] if p.top_k > 0 else order)
    kept = [i for i in order if i in keep]
    z = sum(probs[i].item() for i in kept)
    renorm = {i: probs[i].item() / z for i in kept}
    cum, nucleus = 0.0, []
    for i in kept:
        if cum >= p.top_p:
            break
        nucleus.append(i)
        cum += renorm[i]
    top = renorm[kept[0]]
    final = [i for i in nucleus if renorm[i] >= p.min_p * top]
    out = torch.zeros(len(x), dtype=torch.float64)
    for i in final:
        out[i] = probs[i]
    return out / out.sum()


CASES = [
    SamplingParams(temperature=1.0),
    SamplingParams(temperature=0.5),
    SamplingParams(temperature=1.3, top_k=3),
    SamplingParams(temperature=1.0, top_p=0.7),
    SamplingParams(temperature=1.0, min_p=0.3),
    SamplingParams(temperature=0.8, top_k=6, top_p=0.9, min_p=0.05),
    SamplingParams(temperature=1.0, repetition_penalty=1.5, presence_penalty=0.5, frequency_penalty=0.3),
]


@pytest.mark.parametrize("params", CASES, ids=lambda p: repr(p)[:80])
def test_empirical_frequencies_match_target(params):
    prompt, output = [0, 3], [1, 1, 4]
    target = reference(LOGITS, params, prompt, output)
    torch.manual_seed(1234)  # unseeded rows draw from the global generator, each row its own noise
    req = Request("r", prompt, params, eos_token_id=None)
    req.output_token_ids = list(output)
    sampler = Sampler()
    counts = torch.zeros(len(LOGITS), dtype=torch.float64)
    batch = 500
    for _ in range(DRAWS // batch):  # many rows per call: the vectorised path
        out = sampler(LOGITS.repeat(batch, 1), [req] * batch)
        counts += torch.bincount(torch.tensor(out.token_ids), minlength=len(LOGITS)).double()
    freq = counts / DRAWS
    # Tokens outside the target's support are never drawn; the rest are within 5 standard errors.
    assert torch.all(freq[target == 0] == 0)
    se = torch.sqrt(target * (1 - target) / DRAWS)
    assert torch.all((freq - target).abs() <= 5 * se + 1e-9), (freq, target)


@pytest.mark.parametrize("kernels", [False, True], ids=["torch-argmax", "cpu-kernel-argmax"])
def test_greedy_takes_argmax_after_penalties(kernels):
    ops = cpu_ops() if kernels else None
    if kernels and ops is None:
        pytest.skip("CPU kernels could not be built here")
    p = SamplingParams(temperature=0, repetition_penalty=2.0)
    req = Request("r", [0], p, eos_token_id=None)
    out = Sampler(ops)(LOGITS.unsqueeze(0), [req])
    assert out.token_ids == [1]  # token 0 (logit 2.0 → 1.0) now loses to token 1 (1.5)
    plain = Request("p", [0], SamplingParams(temperature=0), eos_token_id=None)
    assert Sampler(ops)(LOGITS.unsqueeze(0), [plain]).token_ids == [0]  # the one-argmax path


def test_min_tokens_masks_eos():
    p = SamplingParams(temperature=0, min_tokens=2)
    req = Request("r", [5], p, eos_token_id=0)
    assert Sampler()(LOGITS.unsqueeze(0), [req]).token_ids == [1]
    req.output_token_ids = [1, 1]
    assert Sampler()(LOGITS.unsqueeze(0), [req]).token_ids == [0]


def test_logprobs_are_top_n_of_final_distribution():
    p = SamplingParams(temperature=0, logprobs=3)
    req = Request("r", [5], p, eos_token_id=None)
    out = Sampler()(LOGITS.unsqueeze(0), [req])
    chosen, top = out.logprobs[0]
    expected = torch.log_softmax(LOGITS, 0)
    assert [t for t, _ in top] == [0, 1, 2]
    assert math.isclose(chosen, expected[0].item(), rel_tol=1e-5)


def test_seeded_draws_do_not_depend_on_the_batch():
    """A seeded request's draw for output position i is the same alone, in a crowd, or sampled as a
    speculative row (a prefix of proposed tokens standing in for generated ones)."""
    p = SamplingParams(temperature=1.0, seed=7)
    alone = Request("a", [1], p, None, seed=7)
    crowd = Request("b", [1], p, None, seed=7)
    other = Request("c", [1], SamplingParams(temperature=1.0), None)
    solo, mixed = [], []
    for _ in range(20):
        solo.append(Sampler()(LOGITS.unsqueeze(0), [alone]).token_ids[0])
        alone.output_token_ids.append(solo[-1])
        mixed.append(Sampler()(LOGITS.repeat(2, 1), [other, crowd]).token_ids[1])
        crowd.output_token_ids.append(mixed[-1])
    assert solo == mixed
    assert len(set(solo)) > 1  # positions draw different noise
    fresh = Request("d", [1], p, None, seed=7)
    rows = Sampler().sample(LOGITS.repeat(20, 1), [fresh] * 20, [solo[:j] for j in range(20)])
    assert rows.token_ids == solo


def test_logit_bias_moves_the_listed_tokens_only():
    p = SamplingParams(temperature=0, logit_bias={0: -100.0, 7: 4.0}, logprobs=2)
    out = Sampler()(LOGITS.unsqueeze(0), [Request("r", [5], p, eos_token_id=None)])
    biased = LOGITS.clone()
    biased[0] -= 100.0
    biased[7] += 4.0
    assert out.token_ids == [7]  # -1.0 + 4.0 beats token 1's 1.5 once token 0 is banned
    assert math.isclose(out.logprobs[0][0], torch.log_softmax(biased, 0)[7].item(), rel_tol=1e-5)
    # sampled rows see the same biased distribution: a -100 token is never drawn
    banned = SamplingParams(temperature=1.0, seed=3, logit_bias={0: -100.0, 1: -100.0})
    draws = {Sampler()(LOGITS.unsqueeze(0), [Request(f"s{i}", [5], banned, eos_token_id=None)]).token_ids[0]
             for i in range(200)}
    assert not draws & {0, 1} and len(draws) > 2
