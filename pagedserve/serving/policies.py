"""Balancing policies: which replica of a tier takes a request.

Each tier has its own policy object. The router calls `prepare` once per request (kv_aware tokenizes
there), `choose` for each attempt over the replicas that are available, untried and below their
in-flight cap, and `on_routed` with the one it sent the request to. `choose` returns the replica and
a short reason, which the router counts (pagedserve_router_routing_decisions_total).
"""

from __future__ import annotations

import bisect
import hashlib
import logging
from dataclasses import dataclass, field

import httpx

from pagedserve.serving.backends import Backend
from pagedserve.serving.config import CacheAwareConfig, KVAwareConfig
from pagedserve.serving.kv_index import prompt_block_hashes
from pagedserve.serving.radix_tree import RadixTree

logger = logging.getLogger(__name__)


@dataclass
class RouteRequest:
    endpoint: str  # "/v1/completions", "/v1/chat/completions" or "/v1/embeddings"
    body: dict
    headers: dict[str, str]  # lower-cased names
    text: str  # the prompt as text (chat: its messages' contents), for text-based policies
    token_ids: list[int] | None = None  # kv_aware: the prompt's ids, from a replica's /tokenize
    block_hashes: dict[int, list[bytes]] = field(default_factory=dict)  # block size → the prompt's block hashes


class Policy:
    name = "base"

    async def prepare(self, req: RouteRequest, candidates: list[Backend], client: httpx.AsyncClient) -> None:
        """Work done once per request before choosing (nothing for most policies)."""

    def choose(self, candidates: list[Backend], req: RouteRequest) -> tuple[Backend, str]:
        raise NotImplementedError

    def on_routed(self, backend: Backend, req: RouteRequest) -> int:
        """The request went to `backend`; returns the prompt tokens it is expected to prefill there
        (counted in the replica's queued tokens until its first byte comes back)."""
        return 0


class RoundRobin(Policy):
    name = "round_robin"

    def __init__(self) -> None:
        self._next = 0

    def choose(self, candidates: list[Backend], req: RouteRequest) -> tuple[Backend, str]:
        b = candidates[self._next % len(candidates)]
        self._next += 1
        return b, "round_robin"


class LeastLoaded(Policy):
    """The router's in-flight requests plus the replica's own waiting queue (scraped from its /metrics:
    it counts other clients' requests too); KV usage breaks ties, then a rotation."""

    name = "least_loaded"

    def __init__(self) -> None:
        self._turn = 0

    def choose(self, candidates: list[Backend], req: RouteRequest) -> tuple[Backend, str]:
        self._turn += 1
        n = len(candidates)
        order = [candidates[(self._turn + i) % n] for i in range(n)]
        return min(order, key=lambda b: (b.load, b.kv_usage, b.num_running)), "least_loaded"


class Session(Policy):
    """A session key (the session header, else the body's `user`) always maps to the same replica while
    the replica set is the same: consistent hashing, so a replica leaving moves only its own sessions."""

    name = "session"
    VNODES = 64

    def __init__(self, header: str) -> None:
        self.header = header.lower()
        self.fallback = LeastLoaded()
        self._rings: dict[tuple[str, ...], tuple[list[int], list[str]]] = {}

    def key(self, req: RouteRequest) -> str | None:
        key = req.headers.get(self.header)
        if key is None and isinstance(req.body.get("user"), str) and req.body["user"]:
            key = req.body["user"]
        return key

    def choose(self, candidates: list[Backend], req: RouteRequest) -> tuple[Backend, str]:
        key = self.key(req)
        if key is None:
            b, _ = self.fallback.choose(candidates, req)
            return b, "no_session_key"
        urls = tuple(sorted(b.url for b in candidates))
        ring = self._rings.get(urls)
        if ring is None:
            points = sorted((_hash(f"{u}#{i}"), u) for u in urls for i in range(self.VNODES))
            ring = ([p for p, _ in points], [u for _, u in points])
            if len(self._rings) > 64:
                self._rings.clear()
            self._rings[urls] = ring
        i = bisect.bisect(ring[0], _hash(key)) % len(ring[0])
        url = ring[1][i]
        return next(b for b in candidates if b.url == url), "session"


class CacheAware(Policy):
    """SGLang's cache-aware load balancing: an approximate radix tree of each replica's prompts."""

    name = "cache_aware"

    def __init__(self, config: CacheAwareConfig) -> None:
        self.config = config
        self.trees: dict[str, RadixTree] = {}

    def tree(self, b: Backend) -> RadixTree:
        t = self.trees.get(b.url)
        if t is None:
            t = self.trees[b.url] = RadixTree(self.config.max_tree_chars)
        return t

    def choose(self, candidates: list[Backend], req: RouteRequest) -> tuple[Backend, str]:
        c = self.config
        loads = [b.in_flight for b in candidates]
        lo, hi = min(loads), max(loads)
        if hi - lo > c.balance_abs_threshold and hi > lo * c.balance_rel_threshold:
            return min(candidates, key=lambda b: b.in_flight), "imbalanced"
        if req.text:
            matched = [(self.tree(b).match(req.text), -b.in_flight, b) for b in candidates]
            best_len, _, best = max(matched, key=lambda m: (m[0], m[1]))
            if best_len / len(req.text) >= c.cache_threshold:
                return best, "prefix_match"
        return min(candidates, key=lambda b: (self.tree(b).num_chars, b.in_flight)), "smallest_tree"

    def on_routed(self, backend: Backend, req: RouteRequest) -> int:
        if req.text:
            self.tree(backend).insert(req.text)
        return 0


class KVAware(Policy):
    """Routes on each replica's actual prefix cache (the block hashes its /kv_events reported): the
    replica where the prompt would prefill the fewest tokens, counting tokens already queued there
    against it (`queue_penalty` per token)."""

    name = "kv_aware"

    def __init__(self, config: KVAwareConfig, tokenize_timeout_s: float = 5.0) -> None:
        self.config = config
        self.timeout = tokenize_timeout_s
        self.fallback = LeastLoaded()

    async def prepare(self, req: RouteRequest, candidates: list[Backend], client: httpx.AsyncClient) -> None:
        payload: dict = {"model": req.body.get("model")}
        if req.endpoint.endswith("/chat/completions"):
            payload["messages"] = req.body.get("messages")
            if req.body.get("tools"):
                payload["tools"] = req.body["tools"]
        else:
            prompt = req.body.get("input" if req.endpoint.endswith("/embeddings") else "prompt")
            if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
                prompt = prompt[0]  # a batch: its first prompt stands for it
            if isinstance(prompt, list) and all(isinstance(t, int) for t in prompt):
                req.token_ids = prompt
                return
            payload["prompt"] = prompt
        # The replica's own tokenizer and chat template: the ids its engine will hash.
        for b in candidates[:2]:
            try:
                r = await client.post(f"{b.url}/tokenize", json=payload, timeout=self.timeout)
            except httpx.HTTPError:
                continue
            if r.status_code == 200:
                req.token_ids = r.json().get("tokens")
                return
            break  # a 4xx: the request itself is bad; its own replica will say so

    def _hashes(self, req: RouteRequest, block_size: int) -> list[bytes]:
        got = req.block_hashes.get(block_size)
        if got is None:
            assert req.token_ids is not None
            # The last token is always computed (its logits), so only blocks before it can be hits.
            usable = req.token_ids[:max(len(req.token_ids) - 1, 0) // block_size * block_size]
            salt = req.body.get("cache_salt") if isinstance(req.body.get("cache_salt"), str) else None
            got = req.block_hashes[block_size] = prompt_block_hashes(usable, block_size, salt)
        return got

    def saved_tokens(self, b: Backend, req: RouteRequest) -> int:
        if req.token_ids is None or not b.kv.synced or not b.kv.block_size:
            return 0
        return b.kv.cached_tokens(self._hashes(req, b.kv.block_size))

    def choose(self, candidates: list[Backend], req: RouteRequest) -> tuple[Backend, str]:
        if req.token_ids is None:
            b, _ = self.fallback.choose(candidates, req)
            return b, "no_tokens"
        penalty = self.config.queue_penalty
        scored = [(self.saved_tokens(b, req) - penalty * b.queued_tokens, b) for b in candidates]
        top = max(s for s, _ in scored)
        best, _ = self.fallback.choose([b for s, b in scored if s == top], req)  # ties: the least loaded
        return best, "kv_hit" if self.saved_tokens(best, req) > 0 else "kv_miss"

    def on_routed(self, backend: Backend, req: RouteRequest) -> int:
        if req.token_ids is None:
            return 0
        saved = self.saved_tokens(backend, req)
        if backend.kv.block_size:
            # Its blocks will be there once prefilled; count them now so a burst of one prefix stays put
            # before the replica's stored events arrive (they confirm these, or a removal undoes them).
            backend.kv.hashes.update(self._hashes(req, backend.kv.block_size))
        return max(len(req.token_ids) - saved, 0)


def make_policy(name: str, session_header: str, cache_aware: CacheAwareConfig, kv_aware: KVAwareConfig) -> Policy:
    if name == "round_robin":
        return RoundRobin()
    if name == "least_loaded":
        return LeastLoaded()
    if name == "session":
        return Session(session_header)
    if name == "cache_aware":
        return CacheAware(cache_aware)
    if name == "kv_aware":
        return KVAware(kv_aware)
    raise ValueError(f"policy must be one of round_robin, least_loaded, session, cache_aware, kv_aware, got {name!r}")


def _hash(s: str) -> int:
    return int.from_bytes(hashlib.blake2b(s.encode(), digest_size=8).digest(), "big")


def prompt_text(endpoint: str, body: dict) -> str:
    """The text a text-based policy matches on: the prompt, or the chat's message contents in order."""
    if endpoint.endswith("/chat/completions"):
        parts = []
        for m in body.get("messages") or []:
            if not isinstance(m, dict):
                continue
            content = m.get("content")
            if isinstance(content, list):  # content parts: their text
                content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
            parts.append(f"{m.get('role', '')}:{content or ''}\n")
        return "".join(parts)
    prompt = body.get("input") if endpoint.endswith("/embeddings") else body.get("prompt")
    if isinstance(prompt, list) and prompt:
        prompt = prompt[0]
    if isinstance(prompt, list):  # token ids: their digits stand in for text
        return " ".join(str(t) for t in prompt)
    return prompt if isinstance(prompt, str) else ""
