"""Prometheus metrics under vLLM's names, so existing dashboards and autoscalers work unchanged.

Each server has its own CollectorRegistry (several servers can live in one process, as in tests).
`EngineMetrics.on_step` is the EngineClient's step hook: it gets the engine's figures (EngineStats)
and the step's outputs on the engine's side; prometheus_client's metrics are thread-safe to update.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

from pagedserve.engine.protocol import EngineStats, SpecDecodeStats  # the client interface's types only
from pagedserve.outputs import RequestOutput

# vLLM's bucket boundaries (seconds), so histogram panels line up with theirs.
TTFT_BUCKETS = [0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                20.0, 40.0, 80.0, 160.0, 640.0, 2560.0]
ITL_BUCKETS = [0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
               20.0, 40.0, 80.0]
REQUEST_BUCKETS = [0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0,
                   240.0, 480.0, 960.0, 1920.0, 7680.0]


class EngineMetrics:
    def __init__(self, model_name: str, registry: CollectorRegistry | None = None) -> None:
        self.model_name = model_name
        self.registry = registry or CollectorRegistry()
        r, lab = self.registry, ["model_name"]

        def gauge(name: str, doc: str) -> Gauge:
            return Gauge(name, doc, lab, registry=r).labels(model_name)

        def counter(name: str, doc: str) -> Counter:
            return Counter(name, doc, lab, registry=r).labels(model_name)

        def histogram(name: str, doc: str, buckets: list[float]) -> Histogram:
            return Histogram(name, doc, lab, buckets=buckets, registry=r).labels(model_name)

        self.running = gauge("vllm:num_requests_running", "Sequences in the running batch.")
        self.waiting = gauge("vllm:num_requests_waiting", "Sequences waiting to be scheduled.")
        self.kv_usage = gauge("vllm:kv_cache_usage_perc", "KV-cache usage: used blocks / all blocks (1 = 100%).")
        self.kv_free = gauge("pagedserve:kv_blocks_free", "KV-cache blocks not held by any request.")
        self.kv_total = gauge("pagedserve:kv_blocks_total", "KV-cache blocks in the pool.")
        self.prompt_tokens = counter("vllm:prompt_tokens", "Prompt tokens prefilled.")
        self.generation_tokens = counter("vllm:generation_tokens", "Tokens generated.")
        self.preemptions = counter("vllm:num_preemptions", "Sequences preempted (KV blocks freed, recomputed).")
        self._success = Counter("vllm:request_success", "Finished sequences, by finish reason.",
                                ["model_name", "finished_reason"], registry=r)
        self.ttft = histogram("vllm:time_to_first_token_seconds", "Time to first token.", TTFT_BUCKETS)
        self.itl = histogram("vllm:inter_token_latency_seconds", "Time between two output tokens.", ITL_BUCKETS)
        self.e2e = histogram("vllm:e2e_request_latency_seconds", "Arrival to finish.", REQUEST_BUCKETS)
        self.queue_time = histogram("vllm:request_queue_time_seconds", "Arrival to first scheduled.",
                                    REQUEST_BUCKETS)
        # In tokens, as vLLM counts them (hit rate = hits / queries).
        self.prefix_queries = counter("vllm:prefix_cache_queries", "Prompt tokens looked up in the prefix cache.")
        self.prefix_hits = counter("vllm:prefix_cache_hits", "Prompt tokens found in the prefix cache.")
        self.kv_cached = gauge("pagedserve:kv_blocks_cached", "Free KV blocks still holding a cached prefix.")
        # Speculative decoding, vLLM's names (present, at zero, when speculation is off).
        self.spec_drafts = counter("vllm:spec_decode_num_drafts", "Requests' steps that verified proposed tokens.")
        self.spec_draft_tokens = counter("vllm:spec_decode_num_draft_tokens", "Proposed tokens verified.")
        self.spec_accepted = counter("vllm:spec_decode_num_accepted_tokens", "Proposed tokens accepted.")
        self._spec_per_pos = Counter("vllm:spec_decode_num_accepted_tokens_per_pos",
                                     "Proposed tokens accepted, by position in the draft.",
                                     ["model_name", "position"], registry=r)
        self._spec_seen = SpecDecodeStats()
        self._prefilled: set[str] = set()  # requests whose prompt tokens were counted
        self._preemptions_seen = 0
        self._prefix_seen = (0, 0)

    def on_step(self, stats: EngineStats, outputs: list[RequestOutput]) -> None:
        for out in outputs:  # counters first: a scrape that sees idle gauges sees these counted
            self._record(out)
        kv = stats.kv
        self.running.set(stats.num_running)
        self.waiting.set(stats.num_waiting)
        self.kv_usage.set(kv.utilization)
        self.kv_free.set(kv.free_blocks)
        self.kv_total.set(kv.total_blocks)
        self.kv_cached.set(kv.cached_blocks)
        queries, hits = self._prefix_seen
        if kv.prefix_cache_queries > queries:  # the engine's totals: the counters take the difference
            self.prefix_queries.inc(kv.prefix_cache_queries - queries)
            self.prefix_hits.inc(kv.prefix_cache_hits - hits)
            self._prefix_seen = (kv.prefix_cache_queries, kv.prefix_cache_hits)
        if stats.spec_decode is not None and stats.spec_decode.num_drafts > self._spec_seen.num_drafts:
            self._record_spec(stats.spec_decode)
        if stats.num_preemptions > self._preemptions_seen:
            self.preemptions.inc(stats.num_preemptions - self._preemptions_seen)
            self._preemptions_seen = stats.num_preemptions

    def _record_spec(self, spec: SpecDecodeStats) -> None:
        seen = self._spec_seen
        self.spec_drafts.inc(spec.num_drafts - seen.num_drafts)
        self.spec_draft_tokens.inc(spec.num_draft_tokens - seen.num_draft_tokens)
        self.spec_accepted.inc(spec.num_accepted_tokens - seen.num_accepted_tokens)
        for pos, total in enumerate(spec.accepted_per_pos):
            before = seen.accepted_per_pos[pos] if pos < len(seen.accepted_per_pos) else 0
            if total > before:
                self._spec_per_pos.labels(self.model_name, str(pos)).inc(total - before)
        self._spec_seen = spec.copy()

    def _record(self, out: RequestOutput) -> None:
        generated = sum(len(c.token_ids_delta) for c in out.outputs)
        if out.pooling_output is not None:  # an embedding: its prompt was prefilled, nothing generated
            self.prompt_tokens.inc(len(out.prompt_token_ids))
        if generated:
            self.generation_tokens.inc(generated)
            if out.request_id not in self._prefilled:  # the first token means the prompt was prefilled
                self._prefilled.add(out.request_id)
                self.prompt_tokens.inc(len(out.prompt_token_ids))
        if not out.finished:
            return
        self._prefilled.discard(out.request_id)
        for c in out.outputs:
            self._success.labels(self.model_name, c.finish_reason).inc()
        m = out.metrics
        if m is None or any(c.finish_reason == "abort" for c in out.outputs):
            return  # latencies describe served requests only
        if m.ttft is not None:
            self.ttft.observe(m.ttft)
        if m.queue_time is not None:
            self.queue_time.observe(m.queue_time)
        if m.e2e_latency is not None:
            self.e2e.observe(m.e2e_latency)
        for gap in m.inter_token_latencies:
            self.itl.observe(gap)

    def render(self) -> tuple[bytes, str]:
        """The exposition text and its content type."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
