"""What a run records: one RequestRecord per request and one StepSample per engine step (or per HF
decoding step), all times in seconds since the run started. These are the raw measurements that go
into results.json; everything in the report is derived from them.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields


@dataclass
class RequestRecord:
    request_id: str
    arrival: float  # when it reached the system (its arrival offset, or when a closed loop sent it)
    max_tokens: int
    template: str | None = None
    prompt_tokens: int | None = None
    scheduled: float | None = None  # first admitted into a batch
    first_token: float | None = None
    token_times: list[float] = field(default_factory=list)  # one per token (per SSE chunk over HTTP)
    finish: float | None = None
    output_tokens: int = 0
    error: str | None = None
    cached_tokens: int | None = None  # prompt tokens served from a prefix cache, where the system says

    @property
    def ok(self) -> bool:
        return self.error is None and self.finish is not None


@dataclass
class StepSample:
    """One forward step. KV is counted in slots (tokens); blocks = slots / block_size."""

    t: float
    duration: float
    batch_size: int
    num_tokens: int
    num_prefill: int
    kv_allocated_slots: int  # allocated, including slots reserved up front (static) or padding (HF)
    kv_filled_slots: int  # slots that hold a live request's K/V
    kv_capacity_slots: int | None
    block_size: int
    num_waiting: int = 0
    num_preempted: int = 0
    kv_cached_blocks: int = 0  # free blocks still holding a cached prefix (not in use, not in allocated)

    @property
    def waste(self) -> float:
        """Allocated-but-empty over allocated: internal fragmentation plus reservation (or padding)."""
        a = self.kv_allocated_slots
        return (a - self.kv_filled_slots) / a if a else 0.0


@dataclass
class RunResult:
    system: str  # e.g. "pagedserve-continuous", "hf-static16", "llama-server"
    kind: str  # "engine" | "hf" | "openai"
    config: dict
    requests: list[RequestRecord]
    steps: list[StepSample] = field(default_factory=list)
    duration: float = 0.0  # run start → last request finished
    started_unix: float = 0.0
    notes: list[str] = field(default_factory=list)
    # Prefix-cache counters over the run, in prompt tokens: {"queries", "hits", "source"} (engine or /metrics).
    prefix_cache: dict | None = None
    # Speculative decoding's counters over the run (SpecDecodeStats.as_dict), for an engine run with it on.
    spec_decode: dict | None = None

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict) -> RunResult:
        known = {f.name for f in fields(RequestRecord)}
        reqs = [RequestRecord(**{k: v for k, v in r.items() if k in known}) for r in d["requests"]]
        sknown = {f.name for f in fields(StepSample)}
        steps = [StepSample(**{k: v for k, v in s.items() if k in sknown}) for s in d.get("steps", [])]
        return cls(system=d["system"], kind=d["kind"], config=d.get("config", {}), requests=reqs, steps=steps,
                   duration=d.get("duration", 0.0), started_unix=d.get("started_unix", 0.0),
                   notes=list(d.get("notes", [])), prefix_cache=d.get("prefix_cache"),
                   spec_decode=d.get("spec_decode"))
