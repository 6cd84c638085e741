"""`pagedserve router`: the router in front of replicas given by --backend / --config, or (with
--autoscale) of local `pagedserve serve` processes it starts and stops itself.

The web stack is imported inside the command, so `pagedserve --help` stays quick.
"""

from __future__ import annotations

import argparse
import os
import shlex

from pagedserve.serving.config import POLICIES, add_cache_aware_args


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("router", help="OpenAI-compatible router in front of several servers")
    g = p.add_argument_group("router")
    g.add_argument("--backend", action="append", default=[], metavar="URL",
                   help="a replica's base URL, e.g. http://127.0.0.1:8001 (repeatable; one tier)")
    g.add_argument("--config", default=None, help="tiers file (YAML): tiers with a model and replica URLs, rules")
    g.add_argument("--policy", default="round_robin", choices=POLICIES, help="balancing within a tier")
    g.add_argument("--host", default="127.0.0.1", help="bind address (default: loopback only)")
    g.add_argument("--port", type=int, default=8080)
    g.add_argument("--api-key", default=os.environ.get("PAGEDSERVE_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on /v1/* (default: $PAGEDSERVE_API_KEY)")
    g.add_argument("--backend-api-key", default=None, help="the key the replicas want, if any")
    g.add_argument("--session-header", default="X-Session-Id", help="session policy: the header naming a session "
                                                                    "(else the body's user field)")
    g.add_argument("--health-interval", type=float, default=1.0, help="seconds between health checks")
    g.add_argument("--eject-after", type=int, default=2, help="failed health checks in a row that eject a replica")
    g.add_argument("--request-timeout", type=float, default=600.0, help="per-request deadline in seconds")
    g.add_argument("--max-attempts", type=int, default=3,
                   help="replicas tried per request, only before its first byte")
    g.add_argument("--max-in-flight-per-replica", type=int, default=256,
                   help="requests the router keeps at one replica; beyond it they queue")
    g.add_argument("--max-queued-requests", type=int, default=256, help="queued requests; more get 503")
    g.add_argument("--max-queue-wait", type=float, default=30.0, help="seconds a queued request waits at most")
    add_cache_aware_args(g)
    g.add_argument("--kv-queue-penalty", type=float, default=1.0,
                   help="kv_aware: saved prefill tokens one queued token cancels")
    g.add_argument("--kv-poll-interval", type=float, default=0.2, help="kv_aware: seconds between /kv_events reads")
    g.add_argument("--shutdown-timeout", type=float, default=30.0,
                   help="seconds in-flight requests get to finish after SIGTERM")
    g.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    a = p.add_argument_group("autoscaling (local replicas)")
    a.add_argument("--autoscale", action="store_true",
                   help="start and stop `pagedserve serve` replicas on 127.0.0.1 as load changes")
    a.add_argument("--model", default="smollm2-135m", help="the replicas' --model")
    a.add_argument("--serve-args", default="", help="more `pagedserve serve` options for each replica (one string)")
    a.add_argument("--min-replicas", type=int, default=1)
    a.add_argument("--max-replicas", type=int, default=2)
    a.add_argument("--replica-threads", type=int, default=None,
                   help="--num-threads of each replica (default: the CPUs split between max-replicas)")
    a.add_argument("--target-queue", type=float, default=2.0, help="waiting requests per replica to aim at")
    a.add_argument("--target-p95", type=float, default=None, help="p95 request latency (s) to aim at")
    a.add_argument("--target-kv-usage", type=float, default=0.9, help="mean KV usage to aim at")
    a.add_argument("--target-ongoing", type=float, default=None, help="router requests in flight per replica")
    a.add_argument("--upscale-delay", type=float, default=5.0, help="seconds a scale-up wish must hold")
    a.add_argument("--downscale-delay", type=float, default=30.0, help="seconds a scale-down wish must hold")
    a.add_argument("--autoscale-interval", type=float, default=1.0, help="seconds between decisions")
    p.set_defaults(func=cmd_router)


def build_router(args: argparse.Namespace):
    """The Router (and its autoscaler, in local mode) the options describe."""
    from pagedserve.serving.app import Router
    from pagedserve.serving.config import (
        ConfigError,
        KVAwareConfig,
        RouterConfig,
        TierConfig,
        cache_aware_from_args,
        check_url,
        load_tiers,
    )

    tiers, rules = load_tiers(args.config) if args.config else ([], [])
    if args.backend and args.autoscale:
        raise ConfigError("--autoscale starts its own replicas: give it no --backend")
    if args.backend:
        if tiers:
            raise ConfigError("give either --backend or --config, not both")
        tiers = [TierConfig("default", None, [check_url(u, "--backend") for u in args.backend])]
    if args.autoscale:
        if tiers:
            raise ConfigError("--autoscale starts its own replicas: give it no --config")
        tiers = [TierConfig("default", None, [])]
    config = RouterConfig(
        tiers=tiers, rules=rules, policy=args.policy, api_key=args.api_key or None,
        backend_api_key=args.backend_api_key, session_header=args.session_header.lower(),
        health_interval_s=args.health_interval, eject_after_failures=args.eject_after,
        request_timeout_s=args.request_timeout, max_attempts=args.max_attempts,
        max_in_flight_per_replica=args.max_in_flight_per_replica, max_queued_requests=args.max_queued_requests,
        max_queue_wait_s=args.max_queue_wait, shutdown_timeout_s=args.shutdown_timeout,
        cache_aware=cache_aware_from_args(args),
        kv_aware=KVAwareConfig(args.kv_queue_penalty, args.kv_poll_interval))
    router = Router(config)
    if args.autoscale:
        from pagedserve.serving.autoscaler import AutoscalerConfig, AutoscalerPolicy
        from pagedserve.serving.local_replicas import LocalAutoscaler, LocalReplicaSet

        policy = AutoscalerPolicy(AutoscalerConfig(
            min_replicas=args.min_replicas, max_replicas=args.max_replicas, target_queue_per_replica=args.target_queue,
            target_p95_s=args.target_p95, target_kv_usage=args.target_kv_usage,
            target_ongoing_per_replica=args.target_ongoing, upscale_delay_s=args.upscale_delay,
            downscale_delay_s=args.downscale_delay))
        threads = args.replica_threads or max(1, (os.cpu_count() or 1) // args.max_replicas)
        replicas = LocalReplicaSet(router, "default", args.model, shlex.split(args.serve_args), threads)
        scaler = LocalAutoscaler(router, replicas, policy, args.autoscale_interval)
        router.services.append((scaler.start, scaler.stop))
        router.autoscaler = scaler
    return router


def cmd_router(args: argparse.Namespace) -> int:
    import logging
    import signal

    import uvicorn

    from pagedserve.serving.app import build_router_app

    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per forwarded request otherwise
    router = build_router(args)
    app = build_router_app(router)

    class Server(uvicorn.Server):
        def handle_exit(self, sig: int, frame: object) -> None:
            # Drain: /health and new requests get 503 at once; uvicorn stops accepting connections and
            # waits (up to the shutdown timeout) for the responses in flight, streams included.
            router.draining = True
            super().handle_exit(sig, frame)

    config = uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level, lifespan="on",
                            timeout_graceful_shutdown=args.shutdown_timeout)
    server = Server(config)
    # As `pagedserve serve` does: uvicorn re-raises the signal it caught once it is done; a no-op handler
    # turns that into a plain return, so the process exits 0.
    previous = {sig: signal.signal(sig, lambda *_: None) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        server.run()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 0 if server.started else 1
