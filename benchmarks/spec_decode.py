"""Speculative decoding against plain decoding: for each workload and concurrency, one `pagedserve bench`
invocation runs every speculative config and plain decoding (fresh engines, same workload), then one
table for all of them: output tok/s, its ratio to plain, ITL p50/p95, acceptance rate, mean accepted
length.

    .venv/bin/python benchmarks/spec_decode.py [--workloads copy,chapter] [--concurrency 1,4,16,64]
        [--configs JSON_LIST] [--out bench-results/spec]

Requests per invocation grow with the concurrency (8 at 1, else 2x the concurrency, at most 64) so
that each closed loop runs full for most of its time.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from pagedserve.bench.report import spec_decode_rows
from pagedserve.entrypoints.cli import main as cli_main

DEFAULT_CONFIGS = json.dumps([
    None,
    {"method": "ngram", "num_speculative_tokens": 4},
    {"method": "layer_skip", "num_draft_layers": 24, "num_speculative_tokens": 2},
    {"method": "draft_model", "model": "smollm2-135m", "num_speculative_tokens": 2},
])


def requests_for(concurrency: int) -> int:
    return 8 if concurrency == 1 else min(64, 2 * concurrency)


def table(rows: list[list[str]]) -> str:
    head = ["workload", "concurrency", "system", "out tok/s", "vs plain", "ITL p50 ms", "ITL p95 ms", "acceptance",
            "mean accepted length"]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def summarize(workload: str, concurrency: int, results: dict) -> list[list[str]]:
    summaries = [s["summary"] for s in results["systems"]]
    spec = {r["system"]: r for r in spec_decode_rows(summaries)}
    out = []
    for s in summaries:
        r = spec.get(s["system"])
        out.append([workload, str(concurrency), s["system"], f"{s['output_throughput']:.1f}",
                    "1.00x" if r is None else f"{r['speedup']:.2f}x", f"{1000 * s['itl']['p50']:.1f}",
                    f"{1000 * s['itl']['p95']:.1f}", "–" if r is None else f"{100 * r['acceptance_rate']:.1f}%",
                    "–" if r is None else f"{r['mean_accepted_length']:.2f}"])
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workloads", default="copy,chapter")
    ap.add_argument("--concurrency", default="1,4,16,64")
    ap.add_argument("--configs", default=DEFAULT_CONFIGS, help="JSON list of speculative configs; null = plain")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="bench-results/spec")
    args = ap.parse_args()
    rows = []
    for workload in args.workloads.split(","):
        for c in map(int, args.concurrency.split(",")):
            out = Path(args.out) / f"{workload}-c{c}"
            rc = cli_main(["bench", "--policy", "continuous", "--workload", workload, "--concurrency", str(c),
                           "--requests", str(requests_for(c)), "--max-num-seqs", str(max(16, c)),
                           "--seed", str(args.seed), "--speculative-configs", args.configs, "--out", str(out),
                           "--no-progress"])
            if rc != 0:
                print(f"{workload} at concurrency {c}: bench exited {rc}", file=sys.stderr)
                continue
            rows += summarize(workload, c, json.loads((out / "results.json").read_text()))
            print(table(rows), flush=True)
    (Path(args.out) / "summary.md").write_text(table(rows) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
