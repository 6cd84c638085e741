"""Offline throughput: this engine (continuous, static) vs Hugging Face transformers `generate`.

One fixed mixed-length workload (64 requests, prompts of 20–200 tokens, max_tokens 10–300, greedy,
ignore_eos so every system makes the same tokens), same weights, same machine, one invocation.
With both engine policies it also prints their decode cost per token and the most continuous batching
could gain over static on this machine (pagedserve/bench/batch_gain.py).

    .venv/bin/python benchmarks/throughput.py [--requests 64] [--max-num-seqs 16] [--systems continuous,static,hf]
                                              [--device cuda] [--timeline]
    .venv/bin/python benchmarks/throughput.py --max-num-seqs 64 --systems continuous,continuous-spec \
        --speculative-config '{"method": "ngram", "num_speculative_tokens": 4}'
"""

from __future__ import annotations

import argparse
import json
import os
import random
import time

import torch
from corpus import corpus_token_ids  # benchmarks/corpus.py (this folder is on sys.path)

from pagedserve import LLM, SamplingParams
from pagedserve.bench import batch_gain
from pagedserve.bench.runners.engine import step_sample
from pagedserve.model.loader import resolve_model_path


def make_workload(tokenizer, n: int, seed: int) -> list[tuple[list[int], int]]:
    """(prompt token ids, max_tokens) pairs: real text, lengths 20–200 tokens, outputs 10–300."""
    rng = random.Random(seed)
    text_ids = corpus_token_ids(tokenizer)
    work = []
    for _ in range(n):
        length = rng.randint(20, 200)
        start = rng.randint(0, len(text_ids) - length)
        work.append((text_ids[start:start + length], rng.randint(10, 300)))
    return work


def print_timeline(records) -> None:
    """Where the run's time went: steps with prompt tokens, then decode steps by batch size."""
    prefill = [r for r in records if r.num_prefill_seqs]
    decode = [r for r in records if not r.num_prefill_seqs]
    print(f"  steps with prompt tokens: {len(prefill)}, {sum(r.duration for r in prefill):.1f}s; "
          f"decode-only steps: {len(decode)}, {sum(r.duration for r in decode):.1f}s")
    by_size: dict[int, list[float]] = {}
    for r in decode:
        by_size.setdefault((r.num_seqs + 7) // 8 * 8, []).append(r.duration)
    for size, durations in sorted(by_size.items()):
        print(f"    batch {size - 7}-{size}: {len(durations)} steps, {sum(durations):.1f}s, "
              f"{1000 * sum(durations) / len(durations):.1f} ms/step")


def run_engine(system: str, work, max_num_seqs: int, device: str, timeline: bool = False,
               speculative_config: str | None = None) -> tuple[dict, list]:
    """`system` is a policy, optionally suffixed `-nocache` (prefix caching off), `-salted` (caching on,
    every request its own cache_salt: all of the caching work, no hits), for the caching A/B, or `-spec`
    (speculative decoding with `speculative_config`)."""
    policy, _, variant = system.partition("-")
    spec = {"speculative_config": speculative_config} if variant == "spec" else {}
    llm = LLM("smollm2-135m", policy=policy, max_num_seqs=max_num_seqs, max_num_batched_tokens=2048, device=device,
              enable_prefix_caching=variant != "nocache", **spec)
    prompts = [{"prompt_token_ids": ids} | ({"cache_salt": f"r{i}"} if variant == "salted" else {})
               for i, (ids, _) in enumerate(work)]
    params = [SamplingParams(temperature=0, max_tokens=m, ignore_eos=True) for _, m in work]
    llm.generate(prompts[:2], params[:2], use_tqdm=False)  # warm-up
    llm.reset_prefix_cache()  # the run starts cold: no request finds the warm-up's blocks
    llm.engine.record_steps = True
    start = time.perf_counter()
    outs = llm.generate(prompts, params)
    elapsed = time.perf_counter() - start
    if timeline:
        print_timeline(llm.engine.step_records)
    tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    assert tokens == sum(m for _, m in work)
    records = llm.engine.step_records
    decode = batch_gain.decode_steps(step_sample(s, records[0].start) for s in records)
    kv = llm.engine.kv_stats()
    result = {"system": f"pagedserve-{system}", "tokens": tokens, "seconds": elapsed, "tok_per_s": tokens / elapsed,
              "prefix_cache_hit_rate": kv.prefix_cache_hit_rate}
    if (sd := llm.engine.stats().spec_decode) is not None:  # warm-up included: two short requests
        result["spec_decode"] = sd.as_dict()
    return result, decode


def run_hf(work, batch_size: int, device: str) -> dict:
    from transformers import AutoModelForCausalLM

    path = resolve_model_path("smollm2-135m")
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    model = model.to(device).eval()
    pad = model.config.eos_token_id or 0
    start = time.perf_counter()
    tokens = 0
    for i in range(0, len(work), batch_size):
        batch = work[i:i + batch_size]
        width = max(len(ids) for ids, _ in batch)
        input_ids = torch.tensor([[pad] * (width - len(ids)) + ids for ids, _ in batch],  # left padding
                                 device=device)
        mask = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids, _ in batch], device=device)
        new = max(m for _, m in batch)
        with torch.no_grad():
            model.generate(input_ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new,
                           do_sample=False, pad_token_id=pad)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        tokens += sum(m for _, m in batch)  # only the tokens each request asked for count
        print(f"  hf batch {i // batch_size + 1}: {time.perf_counter() - start:.1f}s", flush=True)
    elapsed = time.perf_counter() - start
    return {"system": f"hf-generate-static{batch_size}", "tokens": tokens, "seconds": elapsed,
            "tok_per_s": tokens / elapsed}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--max-num-seqs", type=int, default=16)
    ap.add_argument("--hf-batch-size", type=int, default=16)
    ap.add_argument("--systems", default="continuous,static,hf")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cpu", help="cpu, or cuda for the GPU run (engine and transformers both)")
    ap.add_argument("--json", default=None, help="also write the results here")
    ap.add_argument("--timeline", action="store_true", help="print where each engine run's time went, by step kind")
    ap.add_argument("--speculative-config", default='{"method": "ngram", "num_speculative_tokens": 4}',
                    help="the speculative_config (JSON) of the *-spec systems")
    args = ap.parse_args()
    torch.set_num_threads(torch.get_num_threads())
    from pagedserve.model.loader import load_tokenizer

    work = make_workload(load_tokenizer(resolve_model_path("smollm2-135m")), args.requests, args.seed)
    print(f"workload: {len(work)} requests, {sum(len(p) for p, _ in work)} prompt tokens, "
          f"{sum(m for _, m in work)} output tokens; threads={torch.get_num_threads()}, device={args.device}")
    results = []
    decode_steps = {}
    for system in args.systems.split(","):
        if system == "hf":
            r = run_hf(work, args.hf_batch_size, args.device)
        else:
            r, decode_steps[system] = run_engine(system, work, args.max_num_seqs, args.device, args.timeline,
                                                 args.speculative_config)
        hit = f", prefix-cache hit rate {r['prefix_cache_hit_rate']:.1%}" if "prefix_cache_hit_rate" in r else ""
        if sd := r.get("spec_decode"):
            hit += (f", spec acceptance {sd['acceptance_rate']:.1%}, mean accepted length "
                    f"{sd['mean_accepted_length']:.2f}, steps speculated {sd['num_steps_speculated']}"
                    f"/{sd['num_steps_speculated'] + sd['num_steps_plain']}")
        print(f"{r['system']:>28}: {r['tokens']} tokens in {r['seconds']:.1f}s = {r['tok_per_s']:.1f} tok/s{hit}")
        results.append(r)
    by = {r["system"].split("-")[-1] if r["system"].startswith("pagedserve") else "hf": r for r in results}
    if "continuous" in by:
        if "spec" in by:
            print(f"continuous-spec / continuous: {by['spec']['tok_per_s'] / by['continuous']['tok_per_s']:.3f}x")
        for other in ("static", "hf"):
            if other in by:
                print(f"continuous / {other}: {by['continuous']['tok_per_s'] / by[other]['tok_per_s']:.2f}x")
    gain = batch_gain.batching_gain(decode_steps.get("static", []), decode_steps.get("continuous", []),
                                    args.max_num_seqs)
    if gain is not None:
        print(batch_gain.one_line(gain.to_json()))
    if args.json:
        os.makedirs(os.path.dirname(args.json) or ".", exist_ok=True)
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "results": results,
                       "batching_gain": gain.to_json() if gain else None}, f, indent=2)


if __name__ == "__main__":
    main()
