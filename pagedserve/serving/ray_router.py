"""pagedserve's balancing policies (`policies.py`: cache_aware, least_loaded) as a Ray Serve request router.

Ray Serve makes one request router per DeploymentHandle, in the process holding the handle (here the
ingress replica), and asks it, for each request, which engine replicas to try: `choose_replicas`
returns ranks of replicas, and Ray takes the first replica of the first rank that still has a free
slot (`max_ongoing_requests`), probing queue lengths and backing off when all are full. The policy
objects are the router's own, unchanged; each engine replica is seen through a `Backend` (the router's
view of a replica) whose figures come from here: requests in flight from this handle (counted in
`on_request_routed` / `on_request_completed`), and the replica's waiting queue and KV usage, which each
replica reports through Ray Serve's routing stats (`record_routing_stats`).

The router sees a request's arguments, so the ingress sends the engine an `HTTPForward` carrying the
prompt text (`route_text`, as `policies.prompt_text` builds it) next to the raw HTTP request. It also has
`.prompt` and `.messages`, the attributes Ray's own PrefixCacheAffinityRouter reads.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass
from typing import Any

from ray.serve.request_router import PendingRequest, ReplicaID, RequestRouter, RunningReplica

from pagedserve.serving.backends import Backend
from pagedserve.serving.config import CacheAwareConfig
from pagedserve.serving.policies import CacheAware, LeastLoaded, Policy, RouteRequest

logger = logging.getLogger(__name__)


@dataclass
class HTTPForward:
    """One HTTP request as the ingress read it, sent to an engine replica to answer."""

    method: str
    path: str
    query_string: bytes
    headers: list[tuple[bytes, bytes]]
    body: bytes
    client: tuple[str, int] | None = None
    route_text: str = ""  # what text-based policies match on (policies.prompt_text)
    prompt: Any = None  # the body's prompt / messages, as Ray's PrefixCacheAffinityRouter reads them
    messages: Any = None


def route_text_of(pending_request: PendingRequest | None) -> str:
    if pending_request is None:
        return ""
    for arg in pending_request.args:
        if isinstance(arg, HTTPForward):
            return arg.route_text
    return ""


class PagedServeRequestRouter(RequestRouter):
    """Routes a deployment's requests with one of pagedserve's policies. Requests that name no prompt
    (GET /v1/models, /health) go to the least loaded replica whatever the policy."""

    def initialize_state(self, policy: str = "cache_aware", cache_threshold: float = 0.3,
                         balance_abs_threshold: int = 64, balance_rel_threshold: float = 1.5,
                         max_tree_chars: int = 1 << 20, **_: Any) -> None:
        config = CacheAwareConfig(cache_threshold, balance_abs_threshold, balance_rel_threshold, max_tree_chars)
        self.policy: Policy = CacheAware(config) if policy == "cache_aware" else LeastLoaded()
        self.least_loaded = LeastLoaded()
        self.backends: dict[ReplicaID, Backend] = {}
        # internal request id → (replica the policy chose, its reason): what on_request_routed counts
        self._choices: dict[str, tuple[ReplicaID, str]] = {}
        self._routed: dict[str, ReplicaID] = {}  # in flight from this handle
        self.decisions: Counter[tuple[str, str]] = Counter()  # (replica, reason) → requests

    def _backend(self, replica: RunningReplica) -> Backend:
        b = self.backends.get(replica.replica_id)
        if b is None:
            b = self.backends[replica.replica_id] = Backend(url=replica.replica_id.to_full_id_str(), tier="ray",
                                                            healthy=True, ever_healthy=True)
        stats = replica.routing_stats or {}
        b.num_waiting = float(stats.get("num_waiting", 0.0))
        b.num_running = float(stats.get("num_running", 0.0))
        b.kv_usage = float(stats.get("kv_usage", 0.0))
        return b

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None) -> list[list[RunningReplica]]:
        if not candidate_replicas:
            return []
        text = route_text_of(pending_request)
        by_backend = {id(self._backend(r)): r for r in candidate_replicas}
        backends = [self._backend(r) for r in candidate_replicas]
        policy = self.policy if text else self.least_loaded
        chosen_backend, reason = policy.choose(backends, RouteRequest("", {}, {}, text))
        chosen = by_backend[id(chosen_backend)]
        if pending_request is not None:
            if len(self._choices) > 65536:  # requests cancelled before they were routed leave entries
                self._choices.clear()
            self._choices[pending_request.metadata.internal_request_id] = (chosen.replica_id, reason)
        # The policy's choice first; when it is full, the others from the least loaded up.
        rest = sorted((r for r in candidate_replicas if r is not chosen), key=lambda r: self._backend(r).load)
        return [[chosen], rest] if rest else [[chosen]]

    def on_request_routed(self, pending_request: PendingRequest, replica_id: ReplicaID, result: Any) -> None:
        rid = pending_request.metadata.internal_request_id
        chosen, reason = self._choices.pop(rid, (replica_id, "unknown"))
        if chosen != replica_id:
            reason = "fallback_full"  # the policy's replica had no free slot
        self.decisions[(replica_id.unique_id, reason)] += 1
        backend = self.backends.get(replica_id)
        if backend is None:
            return
        backend.in_flight += 1
        self._routed[rid] = replica_id
        text = route_text_of(pending_request)
        if text:
            self.policy.on_routed(backend, RouteRequest("", {}, {}, text))
        logger.debug("routed %s to %s (%s)", rid, replica_id.unique_id, reason)

    def on_request_completed(self, replica_id: ReplicaID, internal_request_id: str) -> None:
        # A request a full replica refused completes there too, possibly after its retry was routed
        # elsewhere: only the replica that took it counts.
        if self._routed.get(internal_request_id) != replica_id:
            return
        del self._routed[internal_request_id]
        backend = self.backends.get(replica_id)
        if backend is not None:
            backend.in_flight = max(backend.in_flight - 1, 0)

    def update_replicas(self, replicas: list[RunningReplica]) -> None:
        super().update_replicas(replicas)
        current = {r.replica_id for r in replicas}
        for gone in set(self.backends) - current:  # a replica that left takes its tree with it
            backend = self.backends.pop(gone)
            if isinstance(self.policy, CacheAware):
                self.policy.trees.pop(backend.url, None)
