"""Block hashes for automatic prefix caching, and its hit counters.

A full block is named by a hash chained from its parent block's hash and its own token ids, so equal
hashes mean equal whole prefixes, not only equal blocks. The first block also takes the request's
`cache_salt` (vLLM's field): tenants with different salts never share blocks. SHA-256 keeps an
accidental collision — which would silently hand one prompt another's K/V — out of reach.
"""

from __future__ import annotations

import hashlib
from array import array
from dataclasses import dataclass

_ROOT = b"pagedserve-prefix-v1"


def hash_block(parent: bytes | None, token_ids: list[int], extra: bytes = b"") -> bytes:
    h = hashlib.sha256(parent if parent is not None else _ROOT)
    h.update(len(extra).to_bytes(4, "little"))
    h.update(extra)
    h.update(array("q", token_ids).tobytes())
    return h.digest()


def extend_block_hashes(hashes: list[bytes], token_ids: list[int], block_size: int,
                        cache_salt: str | None = None) -> None:
    """Append the hashes of the full blocks of `token_ids` not hashed yet (in place)."""
    for i in range(len(hashes), len(token_ids) // block_size):
        extra = cache_salt.encode() if i == 0 and cache_salt else b""
        parent = hashes[-1] if hashes else None
        hashes.append(hash_block(parent, token_ids[i * block_size:(i + 1) * block_size], extra))


@dataclass
class PrefixCacheStats:
    """Counted in tokens at each admission, as vLLM counts them: queries are the tokens a request
    asked for, hits those found in the cache."""

    requests: int = 0
    queries: int = 0
    hits: int = 0

    def record(self, num_tokens: int, num_hit: int) -> None:
        self.requests += 1
        self.queries += num_tokens
        self.hits += num_hit

    @property
    def hit_rate(self) -> float:
        return self.hits / self.queries if self.queries else 0.0
