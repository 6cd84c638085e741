"""Sampler: logits of the rows that sample this step → next token ids (+ logprobs).

Order of processing, per row: min_tokens masking, logit_bias, repetition/presence/frequency penalties,
temperature (0 = greedy), top-k, top-p (on the top-k renormalised distribution), min-p, sample.
A seeded request's draw for its i-th output token comes from a generator seeded by (seed, i), so its
text depends neither on the batch nor on how many rows a step samples for it: with speculative
decoding a step samples one row per proposed position, and the token at position i is drawn from the
same noise whether or not it was proposed (see rejection_sampler.py).

A row may stand for a request plus proposed tokens not yet accepted (`prefixes`): penalties, min_tokens
and the seed position then count those tokens as generated.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import ModuleType

import torch

from pagedserve.core.request import Request


@dataclass
class SamplerOutput:
    token_ids: list[int]
    # Per row: None, or (chosen token's logprob, [(token id, logprob)] top-N of the final distribution).
    logprobs: list[tuple[float, list[tuple[int, float]]] | None]


def apply_penalties(logits: torch.Tensor, prompt_ids: list[int], output_ids: list[int],
                    repetition: float, presence: float, frequency: float) -> None:
    """In place on one row [V]. Repetition as in HF/vLLM (prompt + output), presence/frequency as OpenAI."""
    if repetition != 1.0:
        seen = torch.tensor(sorted(set(prompt_ids) | set(output_ids)), dtype=torch.long, device=logits.device)
        vals = logits[seen]
        logits[seen] = torch.where(vals > 0, vals / repetition, vals * repetition)
    if (presence or frequency) and output_ids:
        ids = torch.tensor(output_ids, dtype=torch.long, device=logits.device)
        counts = torch.bincount(ids, minlength=logits.shape[-1]).to(logits.dtype)
        logits -= frequency * counts + presence * (counts > 0).to(logits.dtype)


def apply_logit_bias(logits: torch.Tensor, bias: dict[int, float]) -> None:
    """In place on one row [V]: OpenAI's logit_bias, each listed token's logit plus its bias."""
    ids = torch.tensor(list(bias), dtype=torch.long, device=logits.device)
    logits[ids] += torch.tensor(list(bias.values()), dtype=logits.dtype, device=logits.device)


def filter_logits(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
                  min_p: torch.Tensor) -> torch.Tensor:
    """logits [N, V] already divided by temperature → logits with excluded tokens at -inf."""
    vocab = logits.shape[-1]
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    ranks = torch.arange(vocab, device=logits.device).unsqueeze(0)
    keep = ranks < top_k.unsqueeze(1)  # top-k (top_k = vocab when disabled)
    sorted_logits = sorted_logits.masked_fill(~keep, float("-inf"))
    probs = sorted_logits.softmax(dim=-1)
    exclusive_cum = probs.cumsum(dim=-1) - probs  # mass strictly before each token
    keep &= exclusive_cum < top_p.unsqueeze(1)  # smallest prefix reaching top_p; the first always stays
    keep &= probs >= min_p.unsqueeze(1) * probs[:, :1]  # min-p relative to the top token
    sorted_logits = sorted_logits.masked_fill(~keep, float("-inf"))
    return torch.full_like(logits, float("-inf")).scatter_(1, order, sorted_logits)


class Sampler:
    def __init__(self, ops: ModuleType | None = None) -> None:
        self.ops = ops  # the fused CPU kernels, for greedy rows' argmax on float32 CPU logits
        self._generators: dict[torch.device, torch.Generator] = {}

    def generator(self, req: Request, position: int, device: torch.device | str = "cpu") -> torch.Generator | None:
        """The generator on `device` for a seeded request's output token `position` (None: the global one)."""
        if req.seed is None:
            return None
        device = torch.device(device)
        if device not in self._generators:
            self._generators[device] = torch.Generator(device=device)
        return self._generators[device].manual_seed(_mix(req.seed, position))

    def __call__(self, logits: torch.Tensor, requests: list[Request]) -> SamplerOutput:
        return self.sample(logits, requests)

    def sample(self, logits: torch.Tensor, requests: list[Request],
               prefixes: list[list[int]] | None = None) -> SamplerOutput:
        params = [r.params for r in requests]
        simple = all(p.greedy and not p.needs_penalties and p.logprobs is None and p.min_tokens == 0
                     and not p.logit_bias for p in params)
        if simple:  # the common benchmark case: one argmax, no copies
            return SamplerOutput(self._argmax(logits).tolist(), [None] * len(requests))

        prefixes = prefixes or [[] for _ in requests]
        outputs = [req.output_token_ids + pre if pre else req.output_token_ids
                   for req, pre in zip(requests, prefixes, strict=True)]
        logits = logits.float().clone()
        for i, (req, p) in enumerate(zip(requests, params, strict=True)):
            if len(outputs[i]) < p.min_tokens:
                banned = list(p.stop_token_ids)
                if req.eos_token_id is not None and not p.ignore_eos:
                    banned.append(req.eos_token_id)
                if banned:
                    logits[i, banned] = float("-inf")
            if p.logit_bias:
                apply_logit_bias(logits[i], p.logit_bias)
            if p.needs_penalties:
                apply_penalties(logits[i], req.prompt_token_ids, outputs[i],
                                p.repetition_penalty, p.presence_penalty, p.frequency_penalty)

        tokens = self._argmax(logits)
        final = logits  # the distribution logprobs are reported from
        sampled_rows = [i for i, p in enumerate(params) if not p.greedy]
        if sampled_rows:
            dev = logits.device  # the per-row parameters live beside the logits (CUDA too)
            rows = torch.tensor(sampled_rows, dtype=torch.long, device=dev)
            sub = [params[i] for i in sampled_rows]
            temps = torch.tensor([p.temperature for p in sub], dtype=logits.dtype, device=dev).unsqueeze(1)
            vocab = logits.shape[-1]
            top_k = torch.tensor([p.top_k if p.top_k > 0 else vocab for p in sub], device=dev)
            top_p = torch.tensor([p.top_p for p in sub], dtype=logits.dtype, device=dev)
            min_p = torch.tensor([p.min_p for p in sub], dtype=logits.dtype, device=dev)
            filtered = logits[rows] / temps
            if any(p.top_k > 0 or p.top_p < 1.0 or p.min_p > 0.0 for p in sub):  # sorting is the slow part
                filtered = filter_logits(filtered, top_k, top_p, min_p)
            probs = filtered.softmax(dim=-1)
            # On the logits' device, no host sync: the step's one copy is the token ids below.
            noise = torch.empty_like(probs).exponential_()
            for j, i in enumerate(sampled_rows):  # a seeded row's noise comes from its own stream
                gen = self.generator(requests[i], len(outputs[i]), dev)
                if gen is not None:
                    noise[j].exponential_(generator=gen)
            tokens[rows] = (probs / noise).argmax(dim=-1)  # exponential race: argmax p / E, E ~ Exp(1)
            final = logits.clone()
            final[rows] = filtered

        token_list = tokens.tolist()
        logprob_out: list[tuple[float, list[tuple[int, float]]] | None] = [None] * len(requests)
        want = [i for i, p in enumerate(params) if p.logprobs is not None]
        if want:
            logp = final[want].log_softmax(dim=-1)
            for j, i in enumerate(want):
                n = params[i].logprobs
                top_vals, top_ids = logp[j].topk(n) if n else (torch.empty(0), torch.empty(0, dtype=torch.long))
                logprob_out[i] = (float(logp[j, token_list[i]]),
                                  list(zip(top_ids.tolist(), top_vals.tolist(), strict=True)))
        return SamplerOutput(token_list, logprob_out)

    def _argmax(self, logits: torch.Tensor) -> torch.Tensor:
        if self.ops is not None and logits.dtype == torch.float32 and logits.device.type == "cpu":
            return self.ops.argmax_rows(logits.contiguous())  # same ties and NaN rule, ~4x faster
        return logits.argmax(dim=-1)


def _mix(seed: int, position: int) -> int:
    """A 63-bit generator seed for (request seed, output position): splitmix64's finaliser, so nearby
    seeds and positions give unrelated streams."""
    z = (seed * 0x9E3779B97F4A7C15 + position + 1) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return (z ^ (z >> 31)) & 0x7FFFFFFFFFFFFFFF

