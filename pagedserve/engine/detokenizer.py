"""Incremental detokenization and stop-string handling for one sequence.

Text is decoded over a sliding window of tokens (a few of the prompt's last tokens give context,
which SentencePiece tokenizers need for leading spaces); a delta is released only once it no longer
ends in an incomplete UTF-8 sequence (U+FFFD). Stop strings are searched in the whole output text,
so a stop string spanning several tokens is found; text that might be the start of a stop string
is held back from streaming until it is known not to be.
"""

from __future__ import annotations

_PROMPT_CONTEXT_TOKENS = 5


class IncrementalDetokenizer:
    def __init__(self, tokenizer, prompt_token_ids: list[int], stop: list[str],
                 include_stop_str_in_output: bool = False, skip_special_tokens: bool = True) -> None:
        self.tokenizer = tokenizer
        self.stop = stop
        self.include_stop = include_stop_str_in_output
        self.skip_special = skip_special_tokens
        context = prompt_token_ids[-_PROMPT_CONTEXT_TOKENS:]
        self._ids: list[int] = list(context)
        self._prefix_offset = 0
        self._read_offset = len(context)
        self.text = ""  # all output text so far (truncated at a stop string once one is found)
        self._released = 0  # characters of text already handed out as deltas
        self._max_stop_len = max((len(s) for s in stop), default=0)

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special)

    def add_token(self, token_id: int, check_stop: bool = True) -> str | None:
        """Append one generated token. Returns the stop string if the text now contains one."""
        self._ids.append(token_id)
        prefix = self._decode(self._ids[self._prefix_offset:self._read_offset])
        full = self._decode(self._ids[self._prefix_offset:])
        if len(full) > len(prefix) and not full.endswith("\ufffd"):
            new_text = full[len(prefix):]
            self._prefix_offset = self._read_offset
            self._read_offset = len(self._ids)
        else:
            return None  # an incomplete multi-byte character: wait for the next token
        start = max(0, len(self.text) - self._max_stop_len + 1)
        self.text += new_text
        if not check_stop:
            return None
        for s in self.stop:
            idx = self.text.find(s, start)
            if idx != -1:
                self.text = self.text[: idx + len(s)] if self.include_stop else self.text[:idx]
                return s
        return None

    def release(self, finished: bool) -> str:
        """The text delta safe to show now: everything, except a tail that may begin a stop string."""
        end = len(self.text)
        if not finished and self.stop and not self.include_stop:
            end -= _held_back(self.text, self.stop)
        end = max(end, self._released)
        delta = self.text[self._released:end]
        self._released = end
        return delta


def _held_back(text: str, stops: list[str]) -> int:
    """Length of the longest suffix of text that is a proper prefix of some stop string."""
    best = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:k]):
                best = k
                break
    return best
