"""The router's own Prometheus metrics (its own registry, so several routers fit in one process)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

LATENCY_BUCKETS = [0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0]


class RouterMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        r = self.registry = registry or CollectorRegistry()
        self.requests = Counter("pagedserve_router_requests", "Requests answered, by replica and status.",
                                ["tier", "backend", "status"], registry=r)
        self.decisions = Counter("pagedserve_router_routing_decisions", "Replica choices, by policy and reason.",
                                 ["tier", "policy", "backend", "reason"], registry=r)
        self.retries = Counter("pagedserve_router_retries", "Requests sent again to another replica before "
                               "their first byte.", ["tier", "reason"], registry=r)
        self.ejections = Counter("pagedserve_router_ejections", "Replicas taken out of rotation.", ["backend"],
                                 registry=r)
        self.readmissions = Counter("pagedserve_router_readmissions", "Ejected replicas back in rotation.",
                                    ["backend"], registry=r)
        self.rejected = Counter("pagedserve_router_rejected", "Requests refused by the router (503).", ["reason"],
                                registry=r)
        self.healthy = Gauge("pagedserve_router_backend_healthy", "1 while a replica is in rotation.", ["backend"],
                             registry=r)
        self.in_flight = Gauge("pagedserve_router_backend_in_flight", "Requests at a replica, as the router counts.",
                               ["backend"], registry=r)
        self.kv_blocks = Gauge("pagedserve_router_backend_kv_blocks", "Prefix-cache blocks a replica reported "
                               "holding (kv_aware).", ["backend"], registry=r)
        self.queued = Gauge("pagedserve_router_queued_requests", "Requests waiting for a replica slot.", registry=r)
        self.ttfb = Histogram("pagedserve_router_time_to_first_byte_seconds", "Arrival to the first byte sent.",
                              ["tier"], buckets=LATENCY_BUCKETS, registry=r)
        self.latency = Histogram("pagedserve_router_request_latency_seconds", "Arrival to the last byte.",
                                 ["tier"], buckets=LATENCY_BUCKETS, registry=r)
        self.replicas = Gauge("pagedserve_autoscaler_replicas", "Replicas running (not draining).", ["tier"],
                              registry=r)
        self.desired = Gauge("pagedserve_autoscaler_desired_replicas", "The autoscaler's last decision.", ["tier"],
                             registry=r)
        self.scale_decisions = Counter("pagedserve_autoscaler_decisions", "Scaling decisions by direction and "
                                       "reason.", ["tier", "direction", "reason"], registry=r)

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
