"""The copy-heavy workload and the bench's speculative-decoding variants: one engine run per config,
the spec counters of each run, and the report's table."""

from __future__ import annotations

import json

import pytest

from pagedserve.bench.copy_heavy import CODE_EDIT, OUTPUT_TOKENS, copy_workload, stdlib_functions
from pagedserve.bench.offline import parse_speculative_list, spec_label
from pagedserve.bench.workloads import load_jsonl, load_workload, save_jsonl
from pagedserve.entrypoints.cli import main


def test_copy_workload_is_seeded_real_and_sized_to_what_it_repeats(smollm2_tokenizer, tmp_path):
    wl = copy_workload(24, seed=5, tokenizer=smollm2_tokenizer)
    again = copy_workload(24, seed=5, tokenizer=smollm2_tokenizer)
    assert [r.to_json() for r in wl.requests] == [r.to_json() for r in again.requests]
    assert wl.fingerprint() != copy_workload(24, seed=6, tokenizer=smollm2_tokenizer).fingerprint()
    assert set(wl.describe()["templates"]) == {"rewrite", "summary", "code edit"}
    lo, hi = OUTPUT_TOKENS
    assert all(lo <= r.max_tokens <= hi for r in wl.requests)
    for r in wl.requests:
        if r.template == "code edit":  # a real function, and the name to rename occurs in it
            old = r.prompt.split("`")[1]
            code = r.prompt.split("```python\n")[1].split("```")[0]
            assert "def " in code and old in code and r.prompt.startswith(CODE_EDIT.split("`")[0])
    assert len(stdlib_functions()) >= 20
    path = save_jsonl(wl, tmp_path / "copy.jsonl")
    assert load_jsonl(path).fingerprint() == wl.fingerprint()
    assert load_workload("copy", 3, seed=5, concurrency=1).concurrency == 1


def test_speculative_config_lists():
    configs = parse_speculative_list('[null, {"method": "ngram", "num_speculative_tokens": 3}]')
    assert configs[0] is None and configs[1].num_speculative_tokens == 3
    assert parse_speculative_list('["off"]') == [None]
    with pytest.raises(ValueError, match="share a name"):
        parse_speculative_list('[null, "off"]')
    with pytest.raises(ValueError, match="non-empty JSON list"):
        parse_speculative_list('{"method": "ngram"}')
    with pytest.raises(ValueError, match="speculative_config.num_speculative_tokens"):
        parse_speculative_list('[{"method": "ngram", "num_speculative_tokens": 0}]')
    assert spec_label(parse_speculative_list(
        '[{"method": "layer_skip", "num_draft_layers": 2, "num_speculative_tokens": 3}]')[0]) == "spec-layer_skip-m2-k3"


def test_bench_runs_each_speculative_config_and_reports_it(tiny_llama_dir, tmp_path, capsys):
    out = tmp_path / "spec"
    configs = '[null, {"method": "ngram", "num_speculative_tokens": 3}]'
    assert main(["bench", "--model", str(tiny_llama_dir), "--num-blocks", "512", "--block-size", "4",
                 "--max-num-seqs", "4", "--policy", "continuous", "--workload", "copy", "--requests", "3",
                 "--concurrency", "2", "--max-tokens-cap", "24", "--speculative-configs", configs,
                 "--out", str(out), "--no-progress"]) == 0
    results = json.loads((out / "results.json").read_text())
    systems = {s["summary"]["system"]: s for s in results["systems"]}
    assert set(systems) == {"pagedserve-continuous-spec-off", "pagedserve-continuous-spec-ngram-k3"}
    plain, spec = systems["pagedserve-continuous-spec-off"], systems["pagedserve-continuous-spec-ngram-k3"]
    assert plain["summary"]["spec_decode"] is None and plain["run"]["spec_decode"] is None
    sd = spec["summary"]["spec_decode"]
    assert sd["config"]["method"] == "ngram" and sd["num_steps_speculated"] + sd["num_steps_plain"] > 0
    assert sd["num_accepted_tokens"] <= sd["num_draft_tokens"]
    for s in (plain, spec):  # greedy, ignore_eos: every request gets exactly its tokens either way
        assert s["summary"]["completed"] == 3 and s["summary"]["output_tokens_not_max_tokens"] == 0
    md = (out / "report.md").read_text()
    assert "## Speculative decoding" in md and "ngram k=3" in md
    capsys.readouterr()
    assert main(["bench", "--model", str(tiny_llama_dir), "--speculative-config", '{"method": "ngram", '
                 '"num_speculative_tokens": 2}', "--speculative-configs", configs, "--requests", "1"]) == 2
    assert "either --speculative-configs" in capsys.readouterr().err
