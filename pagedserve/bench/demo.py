"""`python -m pagedserve.bench.demo` (for `make demo`): continuous vs static batching vs HF transformers
on the default model, sized to finish in a few minutes on 2 CPU cores, then the headline table.

The chapter's workload with Poisson arrivals; output lengths scaled down from the chapter's ranges
(so a "comprehensive guide" is still ~25× a "what is"), and every system batches at most 16 requests.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from pagedserve.bench.metrics import SLO
from pagedserve.bench.offline import run_offline
from pagedserve.bench.report import terminal_summary
from pagedserve.bench.workloads import chapter_workload


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pagedserve.bench.demo", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--rate", type=float, default=8.0, help="Poisson arrivals, requests/s")
    ap.add_argument("--max-tokens-scale", type=float, default=0.4)
    ap.add_argument("--max-num-seqs", type=int, default=16, help="engine max_num_seqs and HF batch size")
    ap.add_argument("--no-hf", action="store_true", help="skip the Hugging Face transformers baseline")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="bench-results/demo")
    args = ap.parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # no tokenizer thread pool competing with torch

    wl = chapter_workload(args.requests, seed=args.seed, rate=args.rate, max_tokens_scale=args.max_tokens_scale)
    d = wl.describe()
    print(f"demo: {d['num_requests']} chapter requests, {d['arrival']}, max_tokens {d['max_tokens']['min']}–"
          f"{d['max_tokens']['max']} (total {d['max_tokens']['total']}), max {args.max_num_seqs} sequences per batch",
          file=sys.stderr)
    start = time.monotonic()
    engine_options = {"max_num_seqs": args.max_num_seqs, "max_num_batched_tokens": 2048, "kv_cache_memory_gb": 1.0}
    results = run_offline(wl, args.model, engine_options, ("continuous", "static"), () if args.no_hf else ("hf",),
                          hf_batch_size=args.max_num_seqs, out_dir=args.out, slo=SLO(),
                          command="python -m pagedserve.bench.demo " + " ".join(argv or sys.argv[1:]))
    print()
    print(terminal_summary(results, args.out))
    print(f"\nfinished in {time.monotonic() - start:.0f} s; report: {args.out}/report.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
