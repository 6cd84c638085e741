"""`pagedserve bench --prefix-caching on,off` end to end on a tiny model: the prefix and chat workloads,
both settings as systems, the hit-rate and KV columns in results.json, report.md and the plots."""

from __future__ import annotations

import json

import pytest

from pagedserve.bench.plots import PLOT_FILES
from pagedserve.entrypoints.cli import build_parser, main

ENGINE = ["--num-blocks", "512", "--block-size", "4", "--max-num-seqs", "4", "--policy", "continuous"]
SYSTEMS = {"pagedserve-continuous-prefix-on", "pagedserve-continuous-prefix-off"}


def _bench(model_dir, out, *workload: str) -> dict:
    rc = main(["bench", "--model", str(model_dir), *ENGINE, *workload, "--max-tokens-cap", "3",
               "--prefix-caching", "on,off", "--seed", "2", "--out", str(out), "--no-progress"])
    assert rc == 0
    return json.loads((out / "results.json").read_text())


def _check_systems(results: dict) -> dict[str, dict]:
    systems = {s["summary"]["system"]: s for s in results["systems"]}
    assert set(systems) == SYSTEMS
    for name, s in systems.items():
        summary = s["summary"]
        assert summary["completed"] == summary["requests"], (name, summary.get("first_errors"))
        pc = summary["prefix_cache"]
        assert pc["enabled"] is name.endswith("-on")
        assert pc["hit_rate"] is not None and 0.0 <= pc["hit_rate"] <= 1.0, pc
        assert summary["steps"]["kv_peak_allocated_blocks"] >= summary["steps"]["kv_mean_allocated_blocks"] > 0
        assert "kv_peak_cached_blocks" in summary["steps"]
        assert summary["request_throughput"] > 0 and summary["ttft"]["p50"] > 0
    assert systems["pagedserve-continuous-prefix-off"]["summary"]["prefix_cache"]["hit_rate"] == 0.0
    return systems


@pytest.fixture(scope="module")
def prefix_run(tiny_llama_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("bench-prefix") / "run"
    return out, _bench(tiny_llama_dir, out, "--workload", "prefix", "--prefix-tokens", "64", "--requests", "4",
                       "--rate", "50")


def test_prefix_workload_both_settings(prefix_run):
    out, results = prefix_run
    _check_systems(results)
    assert results["workload"]["name"] == "prefix" and results["workload"]["prefix_token_count"] <= 64
    head = results["headline"][0]
    assert (head["target"], head["baseline"]) == ("pagedserve-continuous-prefix-on", "pagedserve-continuous-prefix-off")
    assert any(r["metric"].startswith("Prefix-cache hit rate") for r in head["rows"])
    md = (out / "report.md").read_text()
    assert "## Prefix cache" in md and "hit rate" in md and "KV blocks in use (peak)" in md
    assert "--prefix-caching on,off" in md  # the command that reproduces the run
    for name in PLOT_FILES:
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name


def test_chat_workload_both_settings(tiny_llama_dir, tmp_path):
    results = _bench(tiny_llama_dir, tmp_path / "chat", "--workload", "chat", "--conversations", "2", "--turns", "3",
                     "--think-time", "0.02", "--rate", "20")
    systems = _check_systems(results)
    assert results["workload"]["conversations"] == 2 and results["workload"]["num_requests"] == 6
    by_turn = systems["pagedserve-continuous-prefix-on"]["summary"]["by_template"]
    assert list(by_turn) == ["turn 1", "turn 2", "turn 3"]
    md = (tmp_path / "chat" / "report.md").read_text()
    assert "Time to first token by turn" in md


def test_prefix_caching_flag(capsys):
    parser = build_parser()
    assert parser.parse_args(["bench", "--prefix-caching", "on,off"]).prefix_caching == [True, False]
    assert parser.parse_args(["bench"]).prefix_caching is None
    with pytest.raises(SystemExit):
        parser.parse_args(["bench", "--prefix-caching", "sometimes"])
    # Both ways of setting it at once is ambiguous: refused before any work.
    assert main(["bench", "--prefix-caching", "on", "--no-enable-prefix-caching"]) == 2
    assert "--prefix-caching" in capsys.readouterr().err
