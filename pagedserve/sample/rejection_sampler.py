"""Verifying proposed tokens: keep the target model's distribution exactly (Leviathan et al. 2023,
Chen et al. 2023).

For proposed tokens d_1..d_k drawn from q and target distributions p_0..p_k (p_j is the target's
distribution for the token after d_1..d_j, with every sampling parameter of the request applied), d_j is
accepted with probability min(1, p(d_j) / q(d_j)); at the first rejection the token is drawn from
norm(max(0, p - q)); when all k are accepted a bonus token is drawn from p_k. Every output token is then
distributed exactly as under plain decoding. Greedy requests accept while the target's argmax equals
the proposal, so greedy output is token-identical to plain decoding.

The built-in proposers draft deterministically (q is one-hot: n-gram lookup, a draft model's argmax).
Then the rule reduces to: draw the target's own token t_j ~ p_j at every position and accept d_j while
t_{j-1} == d_j; the first mismatch's t is the output. `accept_prefix` is that form. With a seeded
request the draw at output position i uses the noise plain decoding uses for position i, so a seeded
request's text is the same with and without speculation, whatever the batch. `rejection_sample` is the
general form, for a proposer that samples its drafts from a distribution q.
"""

from __future__ import annotations

import torch


def accept_prefix(target_tokens: list[int], draft_tokens: list[int]) -> list[int]:
    """Tokens this step emits: the drafts the target agreed with, then the target's own token at the
    first disagreement (or the bonus token after all of them). `target_tokens` has one more entry than
    `draft_tokens` (the target's token at each draft position and after the last)."""
    out = []
    for target, draft in zip(target_tokens, draft_tokens, strict=False):
        out.append(target)
        if target != draft:
            return out
    out.append(target_tokens[len(draft_tokens)])
    return out


def rejection_sample(target_probs: torch.Tensor, draft_tokens: list[int], draft_probs: torch.Tensor | None,
                     generator: torch.Generator | None = None) -> list[int]:
    """The general rule. target_probs [k+1, V] (p_0..p_k), draft_probs [k, V] (q_1..q_k; None for a
    deterministic proposer: q one-hot on the draft). Returns the accepted drafts plus one more token."""
    k = len(draft_tokens)
    out: list[int] = []
    for j, token in enumerate(draft_tokens):
        p = target_probs[j]
        if draft_probs is None:
            q = torch.zeros_like(p)
            q[token] = 1.0
        else:
            q = draft_probs[j]
        q_x = float(q[token])
        accept = q_x > 0 and float(torch.rand((), generator=generator)) * q_x < float(p[token])
        if accept:
            out.append(token)
            continue
        residual = (p - q).clamp_min_(0)
        total = float(residual.sum())
        # p == q (nothing left over) can only reject with probability 0; guard the rounding case.
        out.append(_draw(residual / total if total > 0 else p, generator))
        return out
    out.append(_draw(target_probs[k], generator))
    return out


def _draw(probs: torch.Tensor, generator: torch.Generator | None) -> int:
    return int(torch.multinomial(probs, 1, generator=generator))
