"""The router's configuration: tiers (a model and its replicas), routing rules, and the knobs of
health checks, retries, queueing and the balancing policies.

A tiers file (YAML):

```yaml
tiers:
  - name: small
    model: smollm2-135m            # requests whose `model` is this go to this tier
    replicas: [http://127.0.0.1:8001, http://127.0.0.1:8002]
    policy: cache_aware            # optional, else the router's --policy
  - name: large
    model: llama-3-8b
    replicas: [http://127.0.0.1:8101]
rules:                             # for a request whose model names no tier (e.g. "auto"), first match wins
  - {tier: small, header: X-Tier, value: small}
  - {tier: large, min_prompt_chars: 2000}
  - {tier: small}                  # no condition: the default
```
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import yaml

POLICIES = ("round_robin", "least_loaded", "session", "cache_aware", "kv_aware")


class ConfigError(ValueError):
    """A bad tiers file or option; the message names the field."""


@dataclass
class TierConfig:
    name: str
    model: str | None  # None: learned from the replicas' /v1/models (plain --backend mode)
    replicas: list[str]
    policy: str | None = None


@dataclass
class Rule:
    """Sends a request whose `model` names no tier to `tier` when every condition given holds."""

    tier: str
    header: str | None = None
    value: str | None = None  # the header's value (None: the header being present is enough)
    min_prompt_chars: int | None = None
    max_prompt_chars: int | None = None

    def matches(self, headers: dict[str, str], prompt_chars: int) -> bool:
        if self.header is not None:
            got = headers.get(self.header.lower())
            if got is None or (self.value is not None and got != self.value):
                return False
        if self.min_prompt_chars is not None and prompt_chars < self.min_prompt_chars:
            return False
        return not (self.max_prompt_chars is not None and prompt_chars > self.max_prompt_chars)


@dataclass
class CacheAwareConfig:
    """The SGLang gateway's / vllm-router's knobs, with their defaults."""

    cache_threshold: float = 0.3  # route to the longest match when matched / prompt chars >= this
    balance_abs_threshold: int = 64  # load imbalance: max - min in-flight above this ...
    balance_rel_threshold: float = 1.5  # ... and max above this many times min: go least-loaded
    max_tree_chars: int = 1 << 20  # per replica; least recently used branches are evicted beyond it


def add_cache_aware_args(group: Any) -> None:
    """cache_aware's thresholds as command-line options: one declaration for the router and Ray Serve."""
    d = CacheAwareConfig()
    group.add_argument("--cache-threshold", type=float, default=d.cache_threshold,
                       help="cache_aware: match ratio to follow")
    group.add_argument("--balance-abs-threshold", type=int, default=d.balance_abs_threshold,
                       help="cache_aware: in-flight difference beyond which it balances load instead")
    group.add_argument("--balance-rel-threshold", type=float, default=d.balance_rel_threshold,
                       help="cache_aware: ... and in-flight ratio beyond which it balances load instead")


def cache_aware_from_args(args: Any) -> CacheAwareConfig:
    return CacheAwareConfig(args.cache_threshold, args.balance_abs_threshold, args.balance_rel_threshold)


@dataclass
class KVAwareConfig:
    queue_penalty: float = 1.0  # a token already queued at a replica costs this many saved prefill tokens
    poll_interval_s: float = 0.2  # how often each replica's /kv_events is read


@dataclass
class RouterConfig:
    tiers: list[TierConfig]
    rules: list[Rule] = field(default_factory=list)
    policy: str = "round_robin"
    api_key: str | None = None  # clients must send it (Authorization: Bearer) on /v1/*
    backend_api_key: str | None = None  # sent to the replicas, when they want one
    max_body_bytes: int = 1 << 20
    session_header: str = "x-session-id"
    health_interval_s: float = 1.0
    health_timeout_s: float = 2.0
    eject_after_failures: int = 2  # consecutive failed health checks (a refused connection ejects at once)
    readmit_after_successes: int = 1
    metrics_interval_s: float = 0.5  # how often replicas' /metrics are scraped (least_loaded, autoscaler)
    request_timeout_s: float = 600.0  # per request, from arrival to the last byte
    connect_timeout_s: float = 2.0
    max_attempts: int = 3  # replicas tried for one request (only before its first byte reached the client)
    max_in_flight_per_replica: int = 256  # the router's own cap per replica; beyond it requests queue
    max_queued_requests: int = 256  # waiting for a replica slot; more get 503 + Retry-After
    max_queue_wait_s: float = 30.0  # a queued request gives up (503 + Retry-After) after this long
    shutdown_timeout_s: float = 30.0
    cache_aware: CacheAwareConfig = field(default_factory=CacheAwareConfig)
    kv_aware: KVAwareConfig = field(default_factory=KVAwareConfig)

    def validate(self) -> None:
        if not self.tiers:
            raise ConfigError("give at least one backend (--backend URL) or a tiers file (--config)")
        names = set()
        for t in self.tiers:
            if t.name in names:
                raise ConfigError(f"tiers: the name {t.name!r} is used twice")
            names.add(t.name)
            if t.policy is not None and t.policy not in POLICIES:
                raise ConfigError(f"tiers[{t.name}].policy must be one of {', '.join(POLICIES)}, got {t.policy!r}")
            for url in t.replicas:
                check_url(url, f"tiers[{t.name}].replicas")
        if self.policy not in POLICIES:
            raise ConfigError(f"policy must be one of {', '.join(POLICIES)}, got {self.policy!r}")
        for r in self.rules:
            if r.tier not in names:
                raise ConfigError(f"rules: tier {r.tier!r} is not a tier (tiers: {', '.join(sorted(names))})")
        for name in ("health_interval_s", "health_timeout_s", "metrics_interval_s", "request_timeout_s",
                     "connect_timeout_s", "max_queue_wait_s"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be > 0, got {getattr(self, name)}")
        for name in ("eject_after_failures", "readmit_after_successes", "max_attempts", "max_in_flight_per_replica"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_queued_requests < 0:
            raise ConfigError(f"max_queued_requests must be >= 0, got {self.max_queued_requests}")
        ca = self.cache_aware
        if not 0.0 <= ca.cache_threshold <= 1.0:
            raise ConfigError(f"cache_threshold must be in [0, 1], got {ca.cache_threshold}")
        if ca.balance_rel_threshold < 1.0 or ca.balance_abs_threshold < 0:
            raise ConfigError("balance_rel_threshold must be >= 1 and balance_abs_threshold >= 0")


def check_url(url: str, where: str) -> str:
    p = urlparse(url)
    if p.scheme not in ("http", "https") or not p.netloc:
        raise ConfigError(f"{where}: {url!r} is not an http(s) URL")
    return url.rstrip("/")


def load_tiers(path: str | Path) -> tuple[list[TierConfig], list[Rule]]:
    """Read a tiers file; every mistake is a ConfigError naming the field."""
    try:
        data = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as e:
        raise ConfigError(f"cannot read the tiers file {path}: {e}") from None
    if not isinstance(data, dict) or not isinstance(data.get("tiers"), list) or not data["tiers"]:
        raise ConfigError(f"{path}: expected a mapping with a non-empty list 'tiers'")
    unknown = set(data) - {"tiers", "rules"}
    if unknown:
        raise ConfigError(f"{path}: unknown keys {sorted(unknown)} (allowed: tiers, rules)")
    tiers = []
    for i, t in enumerate(data["tiers"]):
        if not isinstance(t, dict):
            raise ConfigError(f"tiers[{i}] must be a mapping")
        extra = set(t) - {"name", "model", "replicas", "policy"}
        if extra:
            raise ConfigError(f"tiers[{i}]: unknown keys {sorted(extra)}")
        name, model, replicas = t.get("name"), t.get("model"), t.get("replicas")
        if not isinstance(name, str) or not name:
            raise ConfigError(f"tiers[{i}].name must be a non-empty string")
        if not isinstance(model, str) or not model:
            raise ConfigError(f"tiers[{i}].model must be a non-empty string")
        if not isinstance(replicas, list) or not replicas or not all(isinstance(u, str) for u in replicas):
            raise ConfigError(f"tiers[{i}].replicas must be a non-empty list of URLs")
        tiers.append(TierConfig(name, model, [check_url(u, f"tiers[{i}].replicas") for u in replicas],
                                t.get("policy")))
    rules = []
    for i, r in enumerate(data.get("rules") or []):
        if not isinstance(r, dict) or not isinstance(r.get("tier"), str):
            raise ConfigError(f"rules[{i}] must be a mapping with a 'tier'")
        extra = set(r) - {"tier", "header", "value", "min_prompt_chars", "max_prompt_chars"}
        if extra:
            raise ConfigError(f"rules[{i}]: unknown keys {sorted(extra)}")
        for k in ("min_prompt_chars", "max_prompt_chars"):
            if k in r and (not isinstance(r[k], int) or r[k] < 0):
                raise ConfigError(f"rules[{i}].{k} must be an integer >= 0")
        rules.append(Rule(r["tier"], r.get("header"), None if r.get("value") is None else str(r["value"]),
                          r.get("min_prompt_chars"), r.get("max_prompt_chars")))
    return tiers, rules
