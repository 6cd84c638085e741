"""Long real text, read offline, for prompts of hundreds or thousands of tokens: CPython's own
reference documentation (`pydoc_data.topics`), else Debian's license texts, else the chapter's
article sentences. A saved workload file holds the exact prompts, so a replay never depends on which
source the replaying machine has.

Token counts use the model's tokenizer when one is given, else an estimate of 4 characters per token.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from pathlib import Path

CHARS_PER_TOKEN = 4  # the estimate without a tokenizer (English prose with some code)
_LICENSES = Path("/usr/share/common-licenses")


def pydoc_topics_text() -> str:
    """CPython's reference documentation as prose: the values of `pydoc_data.topics.topics` in key
    order, separated by blank lines (not the module's Python source, whose string escapes are not
    text). Empty when the stdlib ships without it."""
    try:
        from pydoc_data.topics import topics
    except ImportError:  # some distributions ship the stdlib without it
        return ""
    return "\n\n".join(topics[key].strip("\n") for key in sorted(topics))


def licenses_text() -> str:
    """Debian's /usr/share/common-licenses texts in name order, separated by blank lines; each license
    once (links such as GPL -> GPL-3 skipped). Empty where the folder does not exist."""
    if not _LICENSES.is_dir():
        return ""
    files = [p for p in sorted(_LICENSES.iterdir()) if p.is_file() and not p.is_symlink()]
    return "\n\n".join(p.read_text(errors="replace").strip("\n") for p in files)


def _pydoc_lines() -> list[str]:
    return pydoc_topics_text().splitlines()


def _license_lines() -> list[str]:
    if not _LICENSES.is_dir():
        return []
    return [line for p in sorted(_LICENSES.iterdir()) if p.is_file()
            for line in p.read_text(errors="replace").splitlines()]


def _sentence_lines() -> list[str]:
    import random

    from pagedserve.bench.prompts import ARTICLE_SENTENCES, TOPICS, _fill

    rng = random.Random(0)
    return [_fill(rng, rng.choice(ARTICLE_SENTENCES), rng.choice(TOPICS)) for _ in range(4000)]


@functools.cache
def reference_lines() -> tuple[str, tuple[str, ...]]:
    """(source name, its non-blank lines stripped of surrounding whitespace).

    Stripping matters: trailing spaces before a newline tokenize differently at the end of a text than
    in the middle of one, and a shared prefix must tokenize the same in every prompt.
    """
    for name, read in (("pydoc_data.topics", _pydoc_lines), ("common-licenses", _license_lines),
                       ("chapter article sentences", _sentence_lines)):
        lines = tuple(s for line in read() if (s := line.strip()))
        if len(lines) >= 200:
            return name, lines
    raise RuntimeError("no offline reference text found")  # unreachable: the sentences always exist


def count_tokens(text: str, tokenizer=None) -> int:
    """Tokens of `text` without special tokens (the estimate when there is no tokenizer)."""
    if tokenizer is None:
        return math.ceil(len(text) / CHARS_PER_TOKEN)
    return len(tokenizer.encode(text, add_special_tokens=False))


def take_tokens(lines: Sequence[str], start: int, max_tokens: int, tokenizer=None, sep: str = "\n") -> str:
    """The most consecutive lines from `start` (wrapping around) whose join with `sep` fits in
    `max_tokens`; a first line that alone is too long is cut at a word boundary."""
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")

    def text(k: int) -> str:
        return sep.join(lines[(start + i) % len(lines)] for i in range(k))

    # Upper bound on the lines needed: no token is longer than ~16 characters.
    hi, chars = 0, 0
    while chars <= 16 * max_tokens and hi < 100 * len(lines):
        chars += len(lines[(start + hi) % len(lines)]) + len(sep)
        hi += 1
    lo = 0  # binary search for the largest k with count(text(k)) <= max_tokens
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if count_tokens(text(mid), tokenizer) <= max_tokens:
            lo = mid
        else:
            hi = mid - 1
    if lo:
        return text(lo)
    words = lines[start % len(lines)].split()
    while len(words) > 1 and count_tokens(" ".join(words), tokenizer) > max_tokens:
        words = words[: max(1, len(words) * 3 // 4)]
    return " ".join(words)
