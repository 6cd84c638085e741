"""The live page's data, engine side: the block map matches kv_snapshot() block for block (shared
and cached blocks included), a snapshot stays bounded under load, the history counts what was
generated, and request traces hold the spans the issue names (queued, prefill chunks, decode,
preemptions, cache hits), in a trace file too."""

from __future__ import annotations

import base64
import json

import numpy as np
import pytest

from pagedserve import LLM, SamplingParams
from pagedserve.engine.live_view import CACHED, FREE, MAX_CELLS, SHARED, USED
from pagedserve.engine.step_history import RATE_WINDOW

PROMPT = "The quick brown fox jumps over the lazy dog and then it runs far away into the forest"
OTHER = "A lazy dog sleeps under the warm sun near the old red barn in a quiet little village"


def _cells(snapshot: dict) -> dict[str, np.ndarray]:
    c = snapshot["cells"]
    return {name: np.frombuffer(base64.b64decode(c[name]), dtype=dtype)
            for name, dtype in (("state", "<u1"), ("ref", "<u1"), ("fill", "<u2"), ("owner", "<i4"))}


def _engine(folder, **kwargs):
    options = dict(num_blocks=64, block_size=4, max_num_seqs=8)
    options.update(kwargs)
    engine = LLM(str(folder), **options).engine
    engine.enable_live_view()
    return engine


def _run(engine, steps: int | None = None) -> list:
    outs = []
    n = 0
    while engine.has_unfinished_requests() and (steps is None or n < steps):
        outs += engine.step()
        n += 1
    return outs


def _check_against_kv_snapshot(engine) -> dict:
    snap = engine.live_snapshot(MAX_CELLS, 100)
    cells = _cells(snap)
    infos = engine.kv_snapshot()
    assert snap["cells"]["count"] == len(infos) == snap["kv"]["total_blocks"]
    for info in infos:
        b = info.block_id
        want = {"free": FREE, "cached": CACHED}.get(info.state, SHARED if info.ref_count > 1 else USED)
        assert cells["state"][b] == want, (b, info)
        assert cells["ref"][b] == info.ref_count and cells["fill"][b] == info.num_tokens
        owner = cells["owner"][b]
        assert (snap["owners"][owner] if owner >= 0 else None) == (info.owners[0] if info.owners else None)
    assert snap["kv"]["shared"] == sum(i.ref_count > 1 for i in infos)
    assert snap["kv"]["cached"] == sum(i.state == "cached" for i in infos)
    return snap


def test_block_map_matches_kv_snapshot_with_shared_and_cached_blocks(tiny_llama_dir):
    engine = _engine(tiny_llama_dir)
    params = SamplingParams(temperature=0.8, seed=1, max_tokens=6, n=3, ignore_eos=True)
    engine.add_request("shared", PROMPT, params)
    _run(engine, steps=2)  # the prompt is computed and forked: its full blocks have 3 owners
    snap = _check_against_kv_snapshot(engine)
    assert snap["kv"]["shared"] > 0
    running = {r["id"] for r in snap["requests"]["running"]}
    assert len(running) == 3 and snap["requests"]["totals"]["running"] == 3
    _run(engine)
    snap = _check_against_kv_snapshot(engine)  # all finished: the prompt's full blocks stay cached
    assert snap["kv"]["cached"] > 0 and snap["kv"]["used"] == 0
    engine.add_request("hit", PROMPT + " again", SamplingParams(temperature=0, max_tokens=4))
    _run(engine, steps=1)
    snap = _check_against_kv_snapshot(engine)
    assert snap["requests"]["running"][0]["cached_tokens"] > 0
    assert {r["id"] for r in snap["requests"]["finished"]} == {"shared#0", "shared#1", "shared#2"}


def test_snapshot_stays_bounded_under_load(tiny_llama_dir):
    engine = _engine(tiny_llama_dir, num_blocks=40_000, max_num_seqs=8)
    for i in range(300):
        engine.add_request(f"r{i}", f"{i} {PROMPT}", SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))
    _run(engine, steps=3)
    snap = engine.live_snapshot(MAX_CELLS, 100)
    cells = _cells(snap)
    per_cell = snap["cells"]["blocks_per_cell"]
    assert per_cell == 3 and snap["cells"]["count"] == len(cells["state"]) <= MAX_CELLS
    # a cell shows the most-used state of its blocks and the tokens they hold
    infos = engine.kv_snapshot()
    rank = {"free": FREE, "cached": CACHED}
    for cell in range(0, 200):
        group = infos[cell * per_cell:(cell + 1) * per_cell]
        states = [rank.get(i.state, SHARED if i.ref_count > 1 else USED) for i in group]
        assert cells["state"][cell] == max(states)
        assert cells["fill"][cell] == sum(i.num_tokens for i in group)
    totals = snap["requests"]["totals"]
    assert totals["running"] == 8 and totals["waiting"] == 292
    assert len(snap["requests"]["waiting"]) == 100
    assert len(json.dumps(snap)) < 400_000


def test_history_counts_the_generated_tokens(tiny_llama_dir):
    engine = _engine(tiny_llama_dir)
    for i in range(4):
        engine.add_request(f"h{i}", f"{i} {PROMPT}", SamplingParams(temperature=0, max_tokens=5, ignore_eos=True))
    _run(engine)
    snap = engine.live_snapshot(MAX_CELLS, 100)
    columns = snap["series_columns"]
    rows = snap["series"]
    col = {name: [r[i] for r in rows] for i, name in enumerate(columns)}
    # each row's rate is the mean over the last RATE_WINDOW seconds; the run took a second or two
    assert 20 / RATE_WINDOW <= max(col["output_tokens_per_s"]) <= 20
    assert sum(col["steps"]) >= 5
    assert any(v is not None for v in col["ttft_p50_ms"]) and any(v is not None for v in col["itl_p50_ms"])
    assert rows[-1][0] - rows[0][0] == len(rows) - 1  # one row per second, no holes


def _spans(record: dict) -> list[dict]:
    return record["resourceSpans"][0]["scopeSpans"][0]["spans"]


def _attrs(span: dict) -> dict:
    out = {}
    for a in span["attributes"]:
        v = a["value"]
        out[a["key"]] = next(iter(v.values()))
    return out


def test_traces_have_chunks_decode_preemptions_and_cache_hits(tiny_llama_dir, tmp_path):
    path = tmp_path / "traces.jsonl"
    # an 8-token budget cuts prompts into chunks; 13 blocks of 4 cannot hold two long requests at once
    llm = LLM(str(tiny_llama_dir), num_blocks=13, block_size=4, max_num_seqs=4, max_num_batched_tokens=8,
              trace_file=str(path))
    engine = llm.engine
    engine.enable_live_view()
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    engine.add_request("a", PROMPT, params)
    engine.add_request("b", OTHER, params)
    _run(engine)
    engine.add_request("c", PROMPT, SamplingParams(temperature=0, max_tokens=2))  # prefix-cache hits
    _run(engine)
    engine.core.tracer.close()
    records = {_attrs(_spans(r)[0])["request_id"]: r for r in map(json.loads, path.read_text().splitlines())}
    assert set(records) == {"a", "b", "c"}
    preempted = 0
    for rid, record in records.items():
        spans = _spans(record)
        root = spans[0]
        assert root["name"] == "request" and "parentSpanId" not in root
        assert all(s["parentSpanId"] == root["spanId"] and s["traceId"] == root["traceId"] for s in spans[1:])
        assert {s["name"] for s in spans[1:]} <= {"queued", "prefill", "decode"}
        assert all(int(s["startTimeUnixNano"]) <= int(s["endTimeUnixNano"]) for s in spans)
        attrs = _attrs(root)
        assert attrs["finish_reason"] in ("length", "stop")
        events = [e["name"] for e in root["events"]]
        preempted += events.count("preempted")
        prefill = [s for s in spans if s["name"] == "prefill"]
        if rid in ("a", "b"):
            assert int(attrs["output_tokens"]) == 12
            assert len(prefill) >= 3  # 20+ prompt tokens in chunks of at most 8
            assert sum(int(_attrs(s)["tokens"]) for s in prefill) >= int(attrs["prompt_tokens"])
            assert any(s["name"] == "decode" for s in spans)
    assert preempted >= 1 and len([s for s in _spans(records["a"]) + _spans(records["b"]) if s["name"] == "queued"]) >= 3
    hit = _spans(records["c"])[0]
    assert "cache_hit" in [e["name"] for e in hit["events"]] and int(_attrs(hit)["cached_tokens"]) > 0
    # the live page reads the same records
    assert engine.live_request_trace("a") == records["a"]


def test_live_trace_of_a_waiting_and_a_running_request(tiny_llama_dir):
    engine = _engine(tiny_llama_dir, max_num_seqs=1)
    params = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)
    engine.add_request("first", PROMPT, params)
    engine.add_request("second", OTHER, params)
    _run(engine, steps=3)
    running, waiting = engine.live_request_trace("first"), engine.live_request_trace("second")
    assert _attrs(_spans(running)[0])["finished"] is False
    assert [s["name"] for s in _spans(waiting)] == ["request", "queued"]
    assert engine.live_request_trace("nobody") is None
    engine.abort_request("first")
    aborted = engine.live_request_trace("first")
    assert _attrs(_spans(aborted)[0])["finish_reason"] == "abort" and _spans(aborted)[0]["status"]["code"] == 2


@pytest.mark.parametrize("block_id", [-1, 64, 10_000])
def test_unknown_block_is_none(tiny_llama_dir, block_id):
    engine = _engine(tiny_llama_dir)
    assert engine.live_block(block_id) is None
    assert engine.live_block(0)["state"] == "free"
