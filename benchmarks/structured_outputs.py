"""Structured outputs on vs off: the 64-request workload of throughput.py at 64 seats, greedy, each
request either free or constrained by its own JSON schema (64 distinct schemas, so every one is
compiled), with ignore_eos off so that constrained replies end when their JSON does. Prints output
tok/s both ways, the per-schema compile times and the mean per-step mask cost.

    .venv/bin/python benchmarks/structured_outputs.py [--runs 3]
"""

from __future__ import annotations

import argparse
import statistics
import time

from throughput import make_workload  # benchmarks/throughput.py (this folder is on sys.path)

from pagedserve import LLM, SamplingParams, StructuredOutputsParams


def schema(i: int) -> dict:
    return {"type": "object", "properties": {
        f"name_{i}": {"type": "string", "maxLength": 24},
        "count": {"type": "integer", "minimum": 0, "maximum": 10 ** (i % 6 + 1)},
        "tags": {"type": "array", "items": {"enum": ["a", "b", f"c{i}"]}, "maxItems": 4},
        "ok": {"type": "boolean"}}, "required": [f"name_{i}", "count", "tags", "ok"], "additionalProperties": False}


def run(llm: LLM, prompts: list[dict], params: list[SamplingParams]) -> tuple[float, list[int]]:
    """(seconds, output length per request)."""
    start = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    return time.perf_counter() - start, [len(o.outputs[0].token_ids) for o in outs]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    llm = LLM("smollm2-135m", max_num_seqs=64)
    work = make_workload(llm.get_tokenizer(), 64, 0)
    prompts = [{"prompt_token_ids": ids} for ids, _ in work]
    run(llm, prompts[:4], [SamplingParams(temperature=0, max_tokens=8)] * 4)  # warm-up
    for r in range(args.runs):
        so = [SamplingParams(temperature=0, max_tokens=n,
                             structured_outputs=StructuredOutputsParams(json=schema(64 * r + i)))
              for i, (_, n) in enumerate(work)]
        t_on, lengths = run(llm, prompts, so)
        # the same output lengths without the grammar, so both runs decode the same number of tokens
        free = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in lengths]
        t_off, _ = run(llm, prompts, free)
        n_on = n_off = sum(lengths)
        print(f"run {r}: structured {n_on / t_on:.1f} tok/s ({n_on} tokens), free {n_off / t_off:.1f} tok/s "
              f"({n_off} tokens): {n_on / t_on / (n_off / t_off):.3f}x")
    compile_s = llm.engine.core.structured_outputs().compile_seconds
    if compile_s:
        print(f"grammar compile: {len(compile_s)} schemas, median {statistics.median(compile_s) * 1e3:.2f} ms, "
              f"max {max(compile_s) * 1e3:.2f} ms")


if __name__ == "__main__":
    main()
