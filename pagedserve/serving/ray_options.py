"""The options of `pagedserve serve --ray` (the Ray Serve application, `ray_app.py`).

Nothing here imports ray: `pagedserve --help` and the plain server must work without the extra. The
knobs the router already has keep its names and defaults (`--min-replicas`, `--max-replicas`,
`--target-ongoing`, `--upscale-delay`, `--downscale-delay`, `--autoscale-interval`, the cache_aware
thresholds) and become Ray Serve's `autoscaling_config` and the request router's arguments. The
router's `--policy` is `--ray-policy` here: on `serve`, `--policy` is the engine's batching policy.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import asdict, dataclass, field
from typing import Any

from pagedserve.serving.config import CacheAwareConfig, add_cache_aware_args, cache_aware_from_args

# cache_aware / least_loaded: pagedserve's own policies (policies.py) as a Ray Serve request router;
# power_of_two: Ray Serve's default router, for comparison.
RAY_POLICIES = ("cache_aware", "least_loaded", "power_of_two")


@dataclass
class RayServeOptions:
    address: str | None = None  # None: $RAY_ADDRESS, else the latest local cluster, else a new one in process
    app_name: str = "pagedserve"
    detach: bool = False  # deploy and return, leaving the application on the cluster
    host: str = "127.0.0.1"  # Ray Serve's HTTP proxy
    port: int = 8000
    policy: str = "cache_aware"
    min_replicas: int = 1
    max_replicas: int = 2
    target_ongoing: float = 4.0  # Ray Serve's target_ongoing_requests per replica
    upscale_delay_s: float = 5.0
    downscale_delay_s: float = 30.0
    metrics_interval_s: float = 1.0  # how often each handle reports its load to the autoscaler
    look_back_period_s: float = 10.0  # the window the autoscaler averages over
    max_ongoing_requests: int = 16  # per engine replica; more wait in the request router's queue
    replica_cpus: float = 1.0  # Ray resources one engine replica reserves
    ingress_replicas: int = 1
    routing_stats_period_s: float = 1.0  # how often replicas report their waiting queue and KV usage
    cache_aware: CacheAwareConfig = field(default_factory=CacheAwareConfig)

    def validate(self) -> None:
        if self.policy not in RAY_POLICIES:
            raise ValueError(f"--ray-policy must be one of {', '.join(RAY_POLICIES)} with --ray, got {self.policy!r}")
        if self.min_replicas < 0 or self.max_replicas < max(self.min_replicas, 1):
            raise ValueError(f"--min-replicas must be >= 0 and --max-replicas >= max(min, 1), got "
                             f"{self.min_replicas} and {self.max_replicas}")
        positive = {"--target-ongoing": self.target_ongoing, "--autoscale-interval": self.metrics_interval_s,
                    "--max-ongoing-requests": self.max_ongoing_requests, "--ingress-replicas": self.ingress_replicas,
                    "--routing-stats-period": self.routing_stats_period_s}
        for name, value in positive.items():
            if value <= 0:
                raise ValueError(f"{name} must be > 0, got {value}")
        if self.look_back_period_s <= self.metrics_interval_s:
            raise ValueError(f"--look-back-period ({self.look_back_period_s}) must be longer than "
                             f"--autoscale-interval ({self.metrics_interval_s})")
        if self.upscale_delay_s < 0 or self.downscale_delay_s < 0 or self.replica_cpus < 0:
            raise ValueError("--upscale-delay, --downscale-delay and --replica-cpus must be >= 0")
        ca = self.cache_aware
        if not 0.0 <= ca.cache_threshold <= 1.0:
            raise ValueError(f"--cache-threshold must be in [0, 1], got {ca.cache_threshold}")
        if ca.balance_rel_threshold < 1.0 or ca.balance_abs_threshold < 0:
            raise ValueError("--balance-rel-threshold must be >= 1 and --balance-abs-threshold >= 0")

    def autoscaling_config(self) -> dict[str, Any]:
        """Ray Serve's autoscaling_config (its field names)."""
        return {"min_replicas": self.min_replicas, "max_replicas": self.max_replicas,
                "initial_replicas": max(self.min_replicas, 1),
                "target_ongoing_requests": self.target_ongoing, "upscale_delay_s": self.upscale_delay_s,
                "downscale_delay_s": self.downscale_delay_s, "metrics_interval_s": self.metrics_interval_s,
                "look_back_period_s": self.look_back_period_s}

    def router_kwargs(self) -> dict[str, Any]:
        """The request router's `initialize_state` arguments (plain values: they travel to every handle)."""
        return {"policy": self.policy, **asdict(self.cache_aware)}


def add_ray_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("Ray Serve (--ray; needs: pip install 'pagedserve[ray]')")
    g.add_argument("--ray", action="store_true",
                   help="serve on Ray Serve: one engine per replica, autoscaled, behind Ray Serve's HTTP proxy "
                        "(--host/--port); a local Ray instance, or the cluster at --ray-address / $RAY_ADDRESS")
    g.add_argument("--ray-address", default=None,
                   help="Ray cluster to deploy to (default: $RAY_ADDRESS, else the cluster `ray start --head` "
                        "started here, else a new Ray instance in this process)")
    g.add_argument("--ray-app-name", default="pagedserve", help="the Ray Serve application's name")
    g.add_argument("--ray-detach", action="store_true",
                   help="deploy and return, leaving the application running on the cluster "
                        "(default: serve until SIGINT/SIGTERM, then delete it)")
    g.add_argument("--ray-policy", default="cache_aware", choices=RAY_POLICIES,
                   help="how the request router picks a replica: the router's cache_aware / least_loaded (its "
                        "--policy), or Ray Serve's power_of_two")
    g.add_argument("--min-replicas", type=int, default=1)
    g.add_argument("--max-replicas", type=int, default=2)
    g.add_argument("--target-ongoing", type=float, default=4.0,
                   help="requests in flight per replica the autoscaler aims at (Ray's target_ongoing_requests)")
    g.add_argument("--upscale-delay", type=float, default=5.0, help="seconds a scale-up wish must hold")
    g.add_argument("--downscale-delay", type=float, default=30.0, help="seconds a scale-down wish must hold")
    g.add_argument("--autoscale-interval", type=float, default=1.0,
                   help="seconds between the load reports the autoscaler decides on")
    g.add_argument("--look-back-period", type=float, default=10.0, help="seconds the autoscaler averages over")
    g.add_argument("--max-ongoing-requests", type=int, default=16,
                   help="requests at one engine replica; more wait in the request router's queue")
    g.add_argument("--replica-cpus", type=float, default=1.0, help="Ray CPUs one engine replica reserves")
    g.add_argument("--ingress-replicas", type=int, default=1, help="replicas of the HTTP ingress deployment")
    add_cache_aware_args(g)


def options_from_args(args: argparse.Namespace) -> RayServeOptions:
    opts = RayServeOptions(
        address=args.ray_address or os.environ.get("RAY_ADDRESS") or None, app_name=args.ray_app_name,
        detach=args.ray_detach,
        host=args.host, port=args.port, policy=args.ray_policy, min_replicas=args.min_replicas,
        max_replicas=args.max_replicas, target_ongoing=args.target_ongoing, upscale_delay_s=args.upscale_delay,
        downscale_delay_s=args.downscale_delay, metrics_interval_s=args.autoscale_interval,
        look_back_period_s=args.look_back_period, max_ongoing_requests=args.max_ongoing_requests,
        replica_cpus=args.replica_cpus, ingress_replicas=args.ingress_replicas,
        cache_aware=cache_aware_from_args(args))
    opts.validate()
    return opts
