"""Quantization schemes side by side: weight memory, RSS, single-stream decode, the 64-request workload at
64 seats, and greedy agreement with float32, each scheme in its own process (one at a time: two torch
processes on 2 cores slow each other), in one invocation.

A scheme is LABEL=MODEL[:OPTIONS_JSON]; MODEL is a known name, a GGUF file or an HF folder. The first
scheme is the reference for greedy agreement (share of the reference's tokens reproduced, per prompt up
to the first difference, 16 prompts x 64 tokens). Perplexity, KL divergence and top-1 agreement come
from `pagedserve perplexity` (docs/quality.md).

    .venv/bin/python benchmarks/peers/export_hf_model.py --out benchmarks/peers/.work/models/smollm2-135m-hf
    .venv/bin/python benchmarks/quantization.py --json bench-results/quant.json \
        --scheme fp32=benchmarks/peers/.work/models/smollm2-135m-hf \
        --scheme int8=benchmarks/peers/.work/models/smollm2-135m-hf:'{"quantization": "int8"}' \
        --scheme w8a8=benchmarks/peers/.work/models/smollm2-135m-hf:'{"quantization": "w8a8"}' \
        --scheme q4_1=smollm2-135m
    PAGEDSERVE_CPU_ARCH=haswell .venv/bin/python benchmarks/quantization.py ...   # the AVX2-only build
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

PROMPT_TOPICS = ["assert", "if", "for", "while", "try", "with", "function", "class", "lambda", "import", "global",
                 "return", "yield", "raise", "del", "pass"]


def agreement_prompts() -> list[str]:
    """16 fixed prompts: the opening of Python's own help topics (pydoc_data ships with CPython)."""
    import pydoc_data.topics

    return [" ".join(pydoc_data.topics.topics[t].split()[:40]) for t in PROMPT_TOPICS]


def rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def measure(model: str, options: dict, repeats: int) -> dict:
    """One scheme, in this process."""
    import torch  # noqa: F401  (imported before the engine so load time is the engine's)
    from throughput import make_workload  # benchmarks/throughput.py (this folder is on sys.path)

    from pagedserve import LLM, SamplingParams

    start = time.perf_counter()
    llm = LLM(model, max_num_seqs=64, max_num_batched_tokens=2048, **options)
    result = {"load_s": time.perf_counter() - start, "weight_mib": llm.engine.model.weight_bytes() / 2**20,
              "rss_after_load_mib": rss_mib(), "kernels": getattr(llm.engine.model.fused, "simd_level", str)()}
    tokenizer = llm.engine.tokenizer
    greedy = SamplingParams(temperature=0, max_tokens=64, ignore_eos=True)
    outs = llm.generate(agreement_prompts(), greedy, use_tqdm=False)
    result["greedy_tokens"] = [o.outputs[0].token_ids for o in outs]
    one = SamplingParams(temperature=0, max_tokens=256, ignore_eos=True)
    prompt = [{"prompt_token_ids": tokenizer("The history of the printing press")["input_ids"]}]
    rates = []
    for _ in range(repeats):
        t = time.perf_counter()
        llm.generate(prompt, one, use_tqdm=False)
        rates.append(256 / (time.perf_counter() - t))
    result["single_stream_tok_s"] = statistics.median(rates)
    result["single_stream_runs"] = rates
    work = make_workload(tokenizer, 64, 0)
    prompts = [{"prompt_token_ids": ids} for ids, _ in work]
    params = [SamplingParams(temperature=0, max_tokens=m, ignore_eos=True) for _, m in work]
    llm.reset_prefix_cache()
    t = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    elapsed = time.perf_counter() - t
    result["w64_tok_s"] = sum(len(o.outputs[0].token_ids) for o in outs) / elapsed
    result["rss_peak_mib"] = rss_mib()
    return result


def agreement(reference: list[list[int]], other: list[list[int]]) -> float:
    same = total = 0
    for x, y in zip(reference, other, strict=True):
        total += len(x)
        same += next((i for i, (p, q) in enumerate(zip(x, y, strict=False)) if p != q), min(len(x), len(y)))
    return same / total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scheme", action="append", required=True, help="LABEL=MODEL[:OPTIONS_JSON]")
    ap.add_argument("--repeats", type=int, default=3, help="single-stream runs per scheme (median)")
    ap.add_argument("--json", default=None)
    ap.add_argument("--one", default=None, help=argparse.SUPPRESS)  # internal: measure one scheme, print JSON
    args = ap.parse_args()
    if args.one:
        model, options = json.loads(args.one)
        print("RESULT " + json.dumps(measure(model, options, args.repeats)))
        return
    rows = []
    for spec in args.scheme:
        label, _, rest = spec.partition("=")
        model, _, opts = rest.partition(":{")
        options = json.loads("{" + opts) if opts else {}
        proc = subprocess.run([sys.executable, __file__, "--scheme", spec, "--repeats", str(args.repeats),
                               "--one", json.dumps([model, options])], capture_output=True, text=True,
                              env={**os.environ, "PYTHONPATH": str(Path(__file__).parent)})
        line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
        if line is None:
            raise SystemExit(f"scheme {label} failed:\n{proc.stderr[-3000:]}")
        r = {"label": label, "model": model, "options": options, **json.loads(line[len("RESULT "):])}
        rows.append(r)
        print(f"{label:>10}: weights {r['weight_mib']:.0f} MiB, RSS {r['rss_after_load_mib']:.0f} MiB after load "
              f"({r['rss_peak_mib']:.0f} after W64), single stream {r['single_stream_tok_s']:.1f} tok/s, "
              f"W64 {r['w64_tok_s']:.1f} tok/s [{r['kernels']}]", flush=True)
    ref = rows[0]
    for r in rows:
        r["greedy_agreement"] = agreement(ref["greedy_tokens"], r["greedy_tokens"])
    print(f"\n| scheme | weights MiB | RSS MiB | single-stream tok/s | W64 tok/s | greedy agreement vs {ref['label']} |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['label']} | {r['weight_mib']:.0f} | {r['rss_after_load_mib']:.0f} | "
              f"{r['single_stream_tok_s']:.1f} | {r['w64_tok_s']:.1f} | {r['greedy_agreement']:.3f} |")
    if args.json:
        os.makedirs(os.path.dirname(args.json) or ".", exist_ok=True)
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "results": rows}, f, indent=2)


if __name__ == "__main__":
    main()
