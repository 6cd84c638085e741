"""Engine-agnostic beam search: a step-by-step state machine that makes HF transformers' decisions.

What the installed transformers (5.24, ``GenerationMixin._beam_search``, ``do_sample=False``) does, copied here:

* Seeding: k copies of the prompt, beam 0 scored 0 and beams 1..k-1 scored -1e9, so the first step only
  takes beam 0's tokens. The copies are identical, so we start from ONE live beam; its row alone gives the
  same candidates (the -1e9 rows only matter if the vocab has fewer than 2k tokens).
* Each step: accumulated = running score + log_softmax row (float32), flattened over (beam, token), and
  ``topk(K)`` with K = max(2, 1 + number of EOS ids) * k (2k with a single EOS). Parent = index // V,
  token = index % V. A candidate "hits a stop" if its token is an EOS id, or if it reaches max length
  (generated length == max_new_tokens: then EVERY candidate hits).
* Running beams: the best k candidates that did not hit a stop (stopped ones get -1e9 and
  ``topk(k)`` skips them). They keep the topk order, so the live list stays sorted best-first.
* Finished hypotheses: only stopped candidates ranked in the top k of the K (by cumulative logprob,
  before penalty) are added; an EOS candidate ranked k..K-1 is dropped (neither finished nor continued).
  At max length this means the best k candidates of the last step (live continuations and EOS ones
  alike) become hypotheses with their scores. Score = cum_logprob / gen_len ** length_penalty where
  gen_len counts GENERATED tokens only (the prompt excluded), the EOS token included. HF keeps the best
  k hypotheses: ``topk(k)`` over [k kept slots (-1e9 while empty)] + [K candidate scores, -1e9 if not
  eligible].
* Termination, checked after each step (t = generated length now):
  - all K candidates hit a stop (max length) -> done;
  - early_stopping=True: done as soon as k hypotheses are kept;
  - otherwise a sticky heuristic: once all k slots hold hypotheses, stop when
    best_live_cum / L ** length_penalty <= worst kept score, with L = t for early_stopping=False (and for
    "never" with length_penalty <= 0), and L = max_new_tokens for "never" with length_penalty > 0
    (the optimistic bound for length-rewarding penalties).
* Output: the kept slots, best first (sequences_scores = their scores), EOS token included in the ids.

The float32 arithmetic and the topk calls mirror HF's ops so that ties and scores come out bit-equal.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from pagedserve.sampling_params import MAX_BEAM_WIDTH, BeamSearchParams

__all__ = ["MAX_BEAM_WIDTH", "Beam", "BeamHypothesis", "BeamSearchParams", "BeamSearchState", "BeamStep",
           "beam_logprobs"]

_NEG = -1.0e9  # HF's "impossible" score; reused so masked values round the same way


@dataclass
class Beam:
    token_ids: list[int]  # generated tokens only (not the prompt)
    cum_logprob: float  # exactly a float32 value (HF accumulates in float32)


@dataclass
class BeamHypothesis:
    """A finished beam."""

    token_ids: list[int]  # generated tokens, the EOS token included when finish_reason == "stop"
    cum_logprob: float
    score: float  # cum_logprob / len(token_ids) ** length_penalty, as HF ranks them
    finish_reason: str  # "stop" (EOS) or "length"


@dataclass
class BeamStep:
    # (index of the parent beam in the live list passed to step(), token id) per new live beam, in new live order
    continuing: list[tuple[int, int]] = field(default_factory=list)
    done: bool = False  # no further step needed: call finalize()


def beam_logprobs(logits: torch.Tensor, temperature: float = 0.0) -> torch.Tensor:
    """float32 log_softmax of next-token logits, scaled by 1/temperature first when temperature > 0 (vLLM)."""
    logits = logits.float()
    if temperature > 0:
        logits = logits / temperature
    return torch.log_softmax(logits, dim=-1)


class BeamSearchState:
    """One request's beam search. Feed step() the logprobs of self.live until it says done, then finalize()."""

    def __init__(self, params: BeamSearchParams, prompt_len: int,
                 eos_token_id: int | Sequence[int] | None) -> None:
        self.params = params
        self.prompt_len = prompt_len  # kept for the engine; HF's penalty uses generated length only
        if params.ignore_eos or eos_token_id is None:
            eos: list[int] = []
        elif isinstance(eos_token_id, int):
            eos = [eos_token_id]
        else:
            eos = list(eos_token_id)
        self.eos_token_ids: frozenset[int] = frozenset(eos)
        k = params.beam_width
        # HF keeps (1 + #EOS) * k candidates (at least 2k) so that k of them can always continue.
        self._num_candidates = max(2, 1 + len(eos)) * k
        self.live: list[Beam] = [Beam([], 0.0)]
        self.num_generated = 0  # tokens in each live beam (all live beams have the same length)
        # HF's kept-hypothesis slots: k scores, -1e9 while a slot is empty.
        self._slot_scores = torch.full((k,), _NEG, dtype=torch.float32)
        self._slots: list[BeamHypothesis | None] = [None] * k
        self._improvement_possible = True  # HF's sticky is_early_stop_heuristic_unsatisfied
        self.done = False

    def step(self, logprobs: torch.Tensor) -> BeamStep:
        """logprobs: [len(self.live), V] float32 log-softmax of each live beam's next-token logits.

        Updates self.live (new live order = BeamStep.continuing) and the finished hypotheses.
        """
        if self.done:
            raise RuntimeError("beam search is done; call finalize()")
        if logprobs.dim() != 2 or logprobs.shape[0] != len(self.live):
            raise ValueError(f"logprobs must have shape [{len(self.live)}, vocab], got {tuple(logprobs.shape)}")
        params = self.params
        k = params.beam_width
        vocab = logprobs.shape[1]
        logprobs = logprobs.detach().to(torch.float32)

        # Candidates: the top K (beam, token) pairs by accumulated float32 logprob, as HF's flattened topk.
        cum = torch.tensor([b.cum_logprob for b in self.live], dtype=torch.float32, device=logprobs.device)
        accumulated = (logprobs + cum[:, None]).reshape(-1)
        num_cand = min(self._num_candidates, accumulated.numel())
        top_values, top_indices = torch.topk(accumulated, k=num_cand)
        top_values, top_indices = top_values.cpu(), top_indices.cpu()
        parents = (top_indices // vocab).tolist()
        tokens = (top_indices % vocab).tolist()
        gen_len = self.num_generated + 1  # length of every candidate
        at_max_length = gen_len >= params.max_tokens
        hits = torch.tensor([at_max_length or t in self.eos_token_ids for t in tokens], dtype=torch.bool)

        # Running beams: best k candidates that did not stop (HF masks stopped ones by -1e9, then topk(k)).
        running_values = top_values + hits.to(torch.float32) * _NEG
        next_order = torch.topk(running_values, k=min(k, num_cand))[1].tolist()
        next_order = [i for i in next_order if not hits[i]]  # only short of k in degenerate tiny vocabs
        continuing = [(parents[i], tokens[i]) for i in next_order]
        new_live = [Beam(self.live[parents[i]].token_ids + [tokens[i]], float(running_values[i])) for i in next_order]

        # Finished: stopped candidates within the top k, scored with the length penalty on generated length.
        eligible = hits.clone()
        eligible[k:] = False
        cand_scores = top_values / (gen_len ** params.length_penalty)
        cand_scores = cand_scores + (~eligible).to(torch.float32) * _NEG
        merged_scores = torch.cat((self._slot_scores, cand_scores))
        keep = torch.topk(merged_scores, k=k)[1].tolist()
        new_slots: list[BeamHypothesis | None] = []
        for j in keep:
            if j < k:
                new_slots.append(self._slots[j])
            elif eligible[j - k]:
                i = j - k
                ids = self.live[parents[i]].token_ids + [tokens[i]]
                reason = "stop" if tokens[i] in self.eos_token_ids else "length"
                new_slots.append(BeamHypothesis(ids, float(top_values[i]), float(cand_scores[i]), reason))
            else:  # a masked candidate tied with an empty slot: still empty
                new_slots.append(None)
        self._slots = new_slots
        self._slot_scores = merged_scores[keep]

        self.live = new_live
        self.num_generated = gen_len
        all_full = all(s is not None for s in self._slots)
        if new_live:
            self._update_improvement_possible(running_values[next_order[0]], all_full)
        done = bool(hits.all()) or not new_live or not self._improvement_possible \
            or (params.early_stopping is True and all_full)
        self.done = done
        return BeamStep(continuing=continuing, done=done)

    def _update_improvement_possible(self, best_running: torch.Tensor, all_full: bool) -> None:
        """HF's _check_early_stop_heuristic: can the best live beam still beat the worst kept hypothesis?"""
        params = self.params
        if params.early_stopping == "never" and params.length_penalty > 0.0:
            best_length = params.max_tokens  # a length-rewarding penalty is best at max length
        else:
            best_length = self.num_generated
        best_possible = best_running.reshape(1) / (best_length ** params.length_penalty)
        filled = torch.tensor([s is not None for s in self._slots], dtype=torch.bool)
        worst = torch.where(filled, self._slot_scores.min(), torch.tensor(_NEG, dtype=torch.float32))
        self._improvement_possible = self._improvement_possible and bool((best_possible > worst).any())

    def finalize(self) -> list[BeamHypothesis]:
        """The finished hypotheses, best first, at most beam_width (HF's num_return_sequences=beam_width)."""
        hyps = [s for s in self._slots if s is not None]
        if not hyps and self.live:
            # Only reachable if finalize() is called early: rank the live beams as HF would at max length.
            penalty = max(self.num_generated, 1) ** self.params.length_penalty
            hyps = [BeamHypothesis(b.token_ids, b.cum_logprob, b.cum_logprob / penalty, "length") for b in self.live]
        return hyps
