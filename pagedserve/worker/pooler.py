"""Pooler: turns the final hidden states (after the model's last norm, before lm_head) of a pooling
request's prompt into one vector, across however many steps its prompt is chunked over.

LAST needs only the row of the prompt's last token, which the step that completes the prompt
computes. MEAN sums every prompt token's row step by step (in float64, so that how the prompt is
chunked hardly moves the float32 result) and divides at the end; such a request takes no prefix-cache
hits (Request.skip_prefix_cache), so its chunks cover the prompt from position 0. A chunk that starts
at 0 starts the sum again: after a preemption the prompt is recomputed from the beginning.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from pagedserve.core.request import Request


@dataclass
class _Sum:
    total: torch.Tensor  # [hidden] float64: the rows of positions [0, next_position)
    next_position: int


class Pooler:
    def __init__(self) -> None:
        self._sums: dict[str, _Sum] = {}  # MEAN requests whose prompt is not complete yet

    def forget(self, request_ids: set[str]) -> None:
        """Requests that left the core (finished, aborted): drop their partial sums."""
        for rid in request_ids:
            self._sums.pop(rid, None)

    def pool(self, hidden: torch.Tensor,
             segments: list[tuple[Request, int, int, int, list[int]]]) -> dict[str, list[float]]:
        """Fold this step's rows of each pooling request in; the pooled vectors of the requests whose
        prompt this step completed, by request id. `segments`: the runner's (request, first row, first
        position, tokens, block table) per request of the step."""
        out: dict[str, list[float]] = {}
        for req, row, start, n, _ in segments:
            params = req.pooling_params
            if params is None:
                continue
            end = start + n
            if params.pooling_type == "MEAN":
                state = self._sums.get(req.request_id)
                if start == 0 or state is None or state.next_position != start:
                    assert start == 0, f"{req.request_id}: MEAN pooling needs every prompt token computed"
                    state = _Sum(torch.zeros(hidden.shape[1], dtype=torch.float64, device=hidden.device), 0)
                    self._sums[req.request_id] = state
                state.total += hidden[row:row + n].sum(dim=0, dtype=torch.float64)
                state.next_position = end
                if end < req.num_prompt_tokens:
                    continue
                del self._sums[req.request_id]
                vector = (state.total / req.num_prompt_tokens).float()
            else:  # LAST
                if end < req.num_prompt_tokens:
                    continue
                vector = hidden[row + n - 1].float()
            if params.normalize:
                vector = F.normalize(vector, p=2.0, dim=0)
            out[req.request_id] = vector.cpu().tolist()
        return out
