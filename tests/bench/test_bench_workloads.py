"""Workload generator, arrival processes, workload files and arrival replay."""

from __future__ import annotations

import json
import math
import statistics

import pytest

from pagedserve.bench import arrivals
from pagedserve.bench.prompts import CHAPTER_TEMPLATES
from pagedserve.bench.runners.replay import ArrivalReplay
from pagedserve.bench.workloads import (
    chapter_workload,
    load_jsonl,
    load_sharegpt,
    load_workload,
    save_jsonl,
    scale_max_tokens,
)


def _dump(wl) -> list[dict]:
    return [r.to_json() for r in wl.requests]


def test_chapter_workload_is_deterministic_for_a_seed():
    a, b = chapter_workload(60, seed=7, rate=3.0), chapter_workload(60, seed=7, rate=3.0)
    assert _dump(a) == _dump(b)
    assert a.fingerprint() == b.fingerprint()
    c = chapter_workload(60, seed=8, rate=3.0)
    assert _dump(c) != _dump(a)
    assert c.fingerprint() != a.fingerprint()


def test_chapter_workload_uses_every_template_and_its_output_range():
    wl = chapter_workload(300, seed=1)
    ranges = {name: rng for name, rng, _ in CHAPTER_TEMPLATES}
    assert set(r.template for r in wl.requests) == set(ranges)
    for r in wl.requests:
        lo, hi = ranges[r.template]
        assert lo <= r.max_tokens <= hi
        assert r.temperature == 0.0 and r.ignore_eos


def test_prompts_are_real_text_of_varied_length():
    wl = chapter_workload(200, seed=2)
    words = [len(r.prompt.split()) for r in wl.requests]
    assert min(words) < 25 and max(words) > 150  # a short question ... a pasted article
    assert len(set(r.prompt for r in wl.requests)) > 190  # not "template topic i" repeated
    summaries = [r for r in wl.requests if r.template == "Summarize this article"]
    assert summaries and all(len(r.prompt.split()) > 100 for r in summaries)


def test_prompt_token_lengths_span_roughly_20_to_300(smollm2_tokenizer):
    wl = chapter_workload(200, seed=3)
    lengths = [len(smollm2_tokenizer.encode(r.prompt)) for r in wl.requests]
    assert 5 <= min(lengths) <= 30
    assert 200 <= max(lengths) <= 350
    assert statistics.median(lengths) > 40


def test_max_tokens_scale_and_cap():
    assert scale_max_tokens(800, 0.25) == 200
    assert scale_max_tokens(10, 0.01) == 1
    assert scale_max_tokens(800, 1.0, cap=64) == 64
    full, small = chapter_workload(40, seed=5), chapter_workload(40, seed=5, max_tokens_scale=0.5, max_tokens_cap=100)
    assert [r.prompt for r in full.requests] == [r.prompt for r in small.requests]
    assert all(s.max_tokens == min(100, max(1, round(f.max_tokens * 0.5)))
               for f, s in zip(full.requests, small.requests, strict=True))


def test_poisson_arrivals():
    offsets = arrivals.poisson(4000, rate=5.0, seed=0)
    assert offsets[0] == 0.0
    assert all(b >= a for a, b in zip(offsets, offsets[1:], strict=False))
    mean_gap = offsets[-1] / (len(offsets) - 1)
    assert mean_gap == pytest.approx(0.2, rel=0.08)
    assert arrivals.poisson(10, 2.0, seed=1) == arrivals.poisson(10, 2.0, seed=1)
    with pytest.raises(ValueError, match="rate"):
        arrivals.poisson(3, 0.0)


def test_arrival_modes():
    assert all(r.arrival_offset == 0 for r in chapter_workload(10, rate=None).requests)
    assert all(r.arrival_offset == 0 for r in chapter_workload(10, rate=math.inf).requests)
    timed = chapter_workload(10, rate=2.0)
    assert timed.requests[-1].arrival_offset > 0 and timed.arrival.startswith("Poisson")
    closed = chapter_workload(10, concurrency=3)
    assert closed.concurrency == 3 and closed.rate is None and "concurrency 3" in closed.arrival


def test_jsonl_round_trip(tmp_path):
    wl = chapter_workload(12, seed=4, rate=1.5, max_tokens_scale=0.5)
    path = save_jsonl(wl, tmp_path / "w.jsonl")
    lines = path.read_text().splitlines()
    assert json.loads(lines[0])["workload"]["name"] == "chapter"
    first = json.loads(lines[1])
    assert set(first) >= {"prompt", "max_tokens", "sampling", "arrival_offset"}
    back = load_jsonl(path)
    assert _dump(back) == _dump(wl)
    assert back.fingerprint() == wl.fingerprint()
    assert back.rate == 1.5
    # Loading the file keeps its arrivals unless asked to re-time them.
    assert _dump(load_workload(str(path))) == _dump(wl)
    retimed = load_workload(str(path), rate=100.0)
    assert [r.prompt for r in retimed.requests] == [r.prompt for r in wl.requests]
    assert retimed.requests[-1].arrival_offset < wl.requests[-1].arrival_offset


def test_jsonl_without_header_and_bad_lines(tmp_path):
    path = tmp_path / "plain.jsonl"
    path.write_text(json.dumps({"prompt": "Hello there", "max_tokens": 5}) + "\n")
    wl = load_jsonl(path)
    assert wl.requests[0].max_tokens == 5 and wl.requests[0].ignore_eos
    path.write_text(json.dumps({"prompt": "Hello", "max_tokens": 0}) + "\n")
    with pytest.raises(ValueError, match="max_tokens"):
        load_jsonl(path)


def test_sharegpt_file(tmp_path):
    convs = [{"id": str(i), "conversations": [
        {"from": "human", "value": f"Question number {i}: how do tides work near the coast of Brittany?"},
        {"from": "gpt", "value": " ".join(["word"] * (10 + 3 * i))}]} for i in range(20)]
    convs.append({"id": "x", "conversations": [{"from": "human", "value": "only one turn"}]})
    path = tmp_path / "sg.json"
    path.write_text(json.dumps(convs))
    wl = load_sharegpt(path, num_requests=8, seed=0)
    assert len(wl.requests) == 8 and all(r.template == "sharegpt" for r in wl.requests)
    assert all(r.max_tokens >= 4 for r in wl.requests)
    assert _dump(wl) == _dump(load_sharegpt(path, num_requests=8, seed=0))
    via_spec = load_workload(str(path), num_requests=5, rate=2.0)
    assert len(via_spec.requests) == 5 and via_spec.requests[-1].arrival_offset > 0


class FakeClock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def test_arrival_replay_open_loop():
    wl = chapter_workload(4, seed=0).with_arrivals(rate=1.0)
    offsets = [r.arrival_offset for r in wl.requests]
    clock = FakeClock()
    replay = ArrivalReplay(wl, clock)
    replay.start()
    assert [r.request_id for r, _ in replay.due(0)] == [wl.requests[0].request_id]
    assert replay.due(0) == []
    clock.t += offsets[2] + 1e-9
    due = replay.due(5)
    assert [t for _, t in due] == offsets[1:3]  # arrival = the offset, not when it was handed over
    clock.t += 1e6
    assert len(replay.due(0)) == 1 and replay.exhausted


def test_arrival_replay_closed_loop():
    wl = chapter_workload(5, seed=0, concurrency=2)
    clock = FakeClock()
    replay = ArrivalReplay(wl, clock)
    replay.start()
    assert len(replay.due(0)) == 2
    assert replay.due(2) == []
    clock.t += 3.0
    due = replay.due(1)
    assert len(due) == 1 and due[0][1] == pytest.approx(3.0)  # arrival = when a slot freed
