"""N-gram prompt lookup: the tail of a request's own context (prompt and output so far), found
earlier in that context, proposes the tokens that followed it there. No weights, no model call.

Each request's tokens are kept as one bytes buffer (4 bytes a token, appended as tokens arrive), so the
search is `bytes.rfind` in C: the longest n-gram (prompt_lookup_max down to prompt_lookup_min) whose
most recent earlier occurrence has a continuation wins.
"""

from __future__ import annotations

from array import array
from collections.abc import Iterable

from pagedserve.spec_decode.proposer import DraftItem

_ITEM = 4  # bytes per token id in the buffers


class NgramProposer:
    model_based = False  # a lookup: cheap enough to propose before the controller plans

    def __init__(self, num_speculative_tokens: int, prompt_lookup_min: int, prompt_lookup_max: int) -> None:
        self.k = num_speculative_tokens
        self.min_n = prompt_lookup_min
        self.max_n = prompt_lookup_max
        self._buffers: dict[str, tuple[bytearray, int]] = {}  # request id -> (token bytes, tokens in it)

    def propose(self, items: list[DraftItem]) -> dict[str, list[int]]:
        out = {}
        for item in items:
            if item.max_drafts > 0 and item.sampled:
                drafts = self.lookup(item.request.request_id, item.token_ids, item.max_drafts)
                if drafts:
                    out[item.request.request_id] = drafts
        return out

    def lookup(self, request_id: str, token_ids: list[int], max_tokens: int) -> list[int]:
        """Up to min(k, max_tokens) proposed tokens following `token_ids` (the whole context)."""
        limit = min(self.k, max_tokens)
        if limit <= 0:
            return []
        buf = self._buffer(request_id, token_ids)
        total = len(token_ids)
        for n in range(min(self.max_n, total - 1), self.min_n - 1, -1):
            pattern = bytes(buf[(total - n) * _ITEM:])
            end = (total - 1) * _ITEM  # an earlier occurrence: it must end before the tail's last token
            while True:
                at = buf.rfind(pattern, 0, end)
                if at < 0:
                    break
                if at % _ITEM == 0:  # aligned on a token boundary (not a match across token bytes)
                    start = at // _ITEM + n
                    return token_ids[start:start + limit]
                end = at + len(pattern) - 1
        return []

    def _buffer(self, request_id: str, token_ids: list[int]) -> bytearray:
        entry = self._buffers.get(request_id)
        if entry is None or entry[1] > len(token_ids):
            entry = (bytearray(), 0)
        buf, have = entry
        if have < len(token_ids):
            buf += array("i", token_ids[have:]).tobytes()
        self._buffers[request_id] = (buf, len(token_ids))
        return buf

    def forward(self, inputs) -> None:
        return None  # the step's forward is the runner's own

    def copy_blocks(self, copies: list[tuple[int, int]]) -> None:
        pass  # no cache of its own

    def forget(self, request_ids: Iterable[str]) -> None:
        for rid in request_ids:
            self._buffers.pop(rid, None)
