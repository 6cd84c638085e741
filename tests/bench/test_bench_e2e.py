"""A tiny end-to-end bench: both policies + the HF baseline on a tiny random model → a complete report."""

from __future__ import annotations

import json

import pytest

from pagedserve.bench.plots import PLOT_FILES
from pagedserve.entrypoints.cli import build_parser, main

NUM_REQUESTS = 5
MAX_TOKENS_CAP = 6


@pytest.fixture(scope="module")
def bench_run(tiny_llama_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "run"
    rc = main(["bench", "--model", str(tiny_llama_dir), "--num-blocks", "512", "--block-size", "4",
               "--max-num-seqs", "3", "--policy", "continuous,static", "--baseline", "hf", "--hf-batch-size", "3",
               "--workload", "chapter", "--requests", str(NUM_REQUESTS), "--max-tokens-cap", str(MAX_TOKENS_CAP),
               "--rate", "40", "--seed", "1", "--slo-ttft", "60000", "--out", str(out), "--no-progress"])
    assert rc == 0
    return out


def test_report_is_complete(bench_run):
    for name in ("results.json", "report.md", "workload.jsonl", *PLOT_FILES):
        path = bench_run / name
        assert path.is_file() and path.stat().st_size > 0, name
    for name in PLOT_FILES:
        assert (bench_run / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (bench_run / "report.md").read_text()
    assert "## Headline" in md and "pagedserve-continuous vs pagedserve-static" in md
    assert "## What batching can gain on this machine" in md
    for name in PLOT_FILES:
        assert f"({name})" in md


def test_every_system_measured_the_same_workload(bench_run):
    results = json.loads((bench_run / "results.json").read_text())
    systems = {s["summary"]["system"]: s for s in results["systems"]}
    assert set(systems) == {"pagedserve-continuous", "pagedserve-static", "hf-generate-static3"}
    wanted = {r["id"]: r["max_tokens"] for r in results["workload"]["requests"]}
    assert len(wanted) == NUM_REQUESTS and max(wanted.values()) <= MAX_TOKENS_CAP
    for name, s in systems.items():
        summary, run = s["summary"], s["run"]
        assert summary["completed"] == NUM_REQUESTS, (name, summary.get("first_errors"))
        assert summary["output_tokens_not_max_tokens"] == 0  # greedy + ignore_eos: exactly max_tokens each
        assert summary["goodput"]["count"] == NUM_REQUESTS
        for r in run["requests"]:
            assert r["output_tokens"] == wanted[r["request_id"]] == len(r["token_times"])
            assert r["arrival"] <= r["scheduled"] <= r["first_token"] <= r["finish"]
            assert r["token_times"] == sorted(r["token_times"])
            assert r["prompt_tokens"] > 0
        assert run["steps"], name
        for step in run["steps"]:
            assert 0 <= step["kv_filled_slots"] <= step["kv_allocated_slots"]
            assert step["batch_size"] >= 1
    # Arrivals were replayed: later requests arrived later, identically for every system.
    arrivals = {name: [r["arrival"] for r in s["run"]["requests"]] for name, s in systems.items()}
    assert len({tuple(a) for a in arrivals.values()}) == 1
    # Static reserves prompt + max_tokens at admission; its steps show the reservation as allocated-but-empty.
    static = systems["pagedserve-static"]["run"]["steps"]
    assert any(s["kv_allocated_slots"] - s["kv_filled_slots"] >= 4 for s in static)
    assert results["headline"][0]["target"] == "pagedserve-continuous"
    # Both policies' decode costs per token, from their own step logs.
    gain = results["batching_gain"]
    assert gain["seats"] == 3
    for policy in ("static", "continuous"):
        decode = [s for s in systems[f"pagedserve-{policy}"]["run"]["steps"] if not s["num_prefill"]]
        ms = 1000 * sum(s["duration"] for s in decode) / sum(s["batch_size"] for s in decode)
        assert gain[f"{policy}_ms_per_token"] == pytest.approx(ms)


def test_merged_report_from_results(bench_run, tmp_path):
    out = tmp_path / "merged"
    assert main(["bench", "report", "--inputs", str(bench_run), str(bench_run / "results.json"),
                 "--out", str(out)]) == 0
    results = json.loads((out / "results.json").read_text())
    assert len(results["systems"]) == 6  # duplicates are renamed, not dropped
    assert all((out / name).stat().st_size > 0 for name in PLOT_FILES)


def test_workload_subcommand_writes_a_reusable_file(tmp_path, capsys):
    path = tmp_path / "w.jsonl"
    assert main(["bench", "workload", "--requests", "7", "--rate", "2", "--seed", "3", "--out", str(path)]) == 0
    lines = path.read_text().splitlines()
    assert len(lines) == 8  # header + 7 requests


def test_cli_dispatch_and_url_refusal(capsys):
    parser = build_parser()
    assert parser.parse_args(["bench"]).func.__name__ == "cmd_offline"
    assert parser.parse_args(["bench", "serve", "--url", "http://127.0.0.1:1"]).func.__name__ == "cmd_serve"
    assert parser.parse_args(["bench"]).max_num_seqs == 16
    # Refused before any request is made: only this machine's loopback may be load-tested.
    assert main(["bench", "serve", "--url", "http://10.0.0.7:8000", "--requests", "1"]) == 2
    assert "127.0.0.1" in capsys.readouterr().err


def test_closed_loop_on_the_engine(tiny_llama_dir):
    from pagedserve.bench.runners.engine import run_engine
    from pagedserve.bench.workloads import chapter_workload

    wl = chapter_workload(5, seed=2, concurrency=2, max_tokens_cap=4)
    run = run_engine(wl, str(tiny_llama_dir), "continuous", {"num_blocks": 512, "block_size": 4, "max_num_seqs": 8},
                     progress=False)
    assert all(r.ok and r.output_tokens == r.max_tokens for r in run.requests)
    assert max(s.batch_size for s in run.steps) <= 2  # never more than the loop's concurrency in flight
    assert all(r.arrival > 0 for r in run.requests[2:])  # later ones were released as slots freed


def test_plots_without_per_step_data(tmp_path):
    """A server measured over HTTP records no engine steps: the step plots say so instead of failing."""
    from pagedserve.bench import metrics, plots
    from pagedserve.bench.records import RequestRecord, RunResult

    request = RequestRecord("r1", arrival=0.0, max_tokens=3, prompt_tokens=5, scheduled=0.1, first_token=0.2,
                            token_times=[0.2, 0.3, 0.4], finish=0.4, output_tokens=3)
    run = RunResult("some-server", "openai", {}, [request], steps=[], duration=1.0)
    paths = plots.write_all([run], [metrics.summarize(run)], tmp_path)
    assert [p.name for p in paths] == list(PLOT_FILES)
    for p in paths:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _html_data(path) -> dict:
    text = path.read_text()
    start = text.index('<script id="data" type="application/json">') + len('<script id="data" type="application/json">')
    return json.loads(text[start:text.index("</script>", start)])


def test_html_report_holds_every_system_and_draws_in_a_browser(bench_run):
    from tests.browser import chromium_available, console_errors, headless_chromium

    page = bench_run / "report.html"
    data = _html_data(page)
    results = json.loads((bench_run / "results.json").read_text())
    assert [s["name"] for s in data["systems"]] == [s["summary"]["system"] for s in results["systems"]]
    for system, entry in zip(data["systems"], results["systems"], strict=True):
        assert system["figures"]["completed"] == entry["summary"]["completed"]
        assert len(system["cdf"]["ttft"]["xs"]) == entry["summary"]["ttft"]["count"]
    assert "cdn" not in page.read_text().lower()
    if not chromium_available():
        pytest.skip("needs Debian's chromium and chromium-driver for the drawing half")
    driver = headless_chromium()
    try:
        driver.get(page.as_uri())
        charts = driver.find_elements("css selector", "canvas[data-chart]")
        assert len(charts) == 8
        assert all(int(c.get_attribute("data-points") or 0) > 0 for c in charts)
        assert not console_errors(driver)
    finally:
        driver.quit()
