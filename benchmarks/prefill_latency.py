"""Prefill latency of one long prompt (real text), alone: the median of three prompts per length.

    .venv/bin/python benchmarks/prefill_latency.py [--lengths 1000,2000]

Each prompt is a different slice of the GPL-3 text (Debian's base-files), and the prefix cache is
emptied after each, so every prompt is prefilled in full.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

from pagedserve import LLM, SamplingParams


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lengths", default="1000,2000")
    args = ap.parse_args()
    llm = LLM("smollm2-135m")
    ids = llm.get_tokenizer().encode(Path("/usr/share/common-licenses/GPL-3").read_text())
    params = SamplingParams(temperature=0, max_tokens=1)
    llm.generate({"prompt_token_ids": ids[:64]}, params, use_tqdm=False)  # warm-up
    for n in (int(x) for x in args.lengths.split(",")):
        times = []
        for r in range(3):
            start = time.perf_counter()
            llm.generate({"prompt_token_ids": ids[r * 7:r * 7 + n]}, params, use_tqdm=False)
            times.append(time.perf_counter() - start)
            llm.reset_prefix_cache()
        print(f"{n}-token prompt: prefill + first token {statistics.median(times):.3f} s (median of 3)")


if __name__ == "__main__":
    main()
