"""The server's speculative-decoding counters under vLLM's names, moved by the engine's totals."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

from pagedserve.core.kv_cache_manager import KVCacheStats
from pagedserve.engine.protocol import EngineStats
from pagedserve.entrypoints.openai.metrics import EngineMetrics
from pagedserve.outputs import RequestMetrics
from pagedserve.spec_decode.stats import SpecDecodeStats


def _samples(metrics: EngineMetrics) -> dict[tuple[str, tuple], float]:
    text = metrics.render()[0].decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def _stats(spec: SpecDecodeStats | None) -> EngineStats:
    return EngineStats(1, 0, 0, KVCacheStats(10, 1, 9, 16, 3, 1), spec)


def test_spec_counters_follow_the_engine_totals():
    m = EngineMetrics("m")
    spec = SpecDecodeStats()
    m.on_step(_stats(None), [])  # speculation off: the counters exist, at zero
    model = (("model_name", "m"),)
    assert _samples(m)[("vllm:spec_decode_num_drafts_total", model)] == 0
    spec.record(4, 3)
    spec.record(4, 1)
    m.on_step(_stats(spec.copy()), [])
    spec.record(2, 2)
    m.on_step(_stats(spec.copy()), [])
    m.on_step(_stats(spec.copy()), [])  # no change: nothing counted twice
    s = _samples(m)
    assert s[("vllm:spec_decode_num_drafts_total", model)] == 3
    assert s[("vllm:spec_decode_num_draft_tokens_total", model)] == 10
    assert s[("vllm:spec_decode_num_accepted_tokens_total", model)] == 6
    per_pos = {dict(labels)["position"]: v for (name, labels), v in s.items()
               if name == "vllm:spec_decode_num_accepted_tokens_per_pos_total"}
    assert per_pos == {"0": 3, "1": 2, "2": 1}
    assert spec.acceptance_rate == 0.6 and spec.mean_accepted_length == 3.0


def test_tokens_accepted_together_are_one_inter_token_gap():
    m = RequestMetrics(0.0, 0.1, 0.2, 0.9, token_times=[0.2, 0.2, 0.2, 0.5, 0.9, 0.9])
    assert m.inter_token_latencies == [0.5 - 0.2, 0.9 - 0.5]
