"""KV memory shared between sequences: parallel sampling (n > 1) and beam search, against the same
sequences without sharing and against transformers' beam search.

    .venv/bin/python benchmarks/memory_sharing.py [--parts sampling,beam] [--prompt-tokens 1000]
                                                  [--beam-prompts 8] [--beam-width 4] [--max-tokens 64]

sampling: one long prompt (real text) with n = 4, then the same four samples as four separate requests
(seeds seed..seed+3, prefix caching off so nothing is shared): peak KV blocks in use and wall time.
beam: prompts of real text, beam search width k through the engine (all prompts in one batch), then
through transformers `generate(num_beams=k)` one prompt at a time: wall time, the best beams' agreement,
peak KV memory (ours: blocks in use x block bytes; transformers: its returned cache's tensors), and
the PagedAttention paper's memory saving: 1 - physical blocks / the blocks the sequences would hold
unshared (the sum of their block tables), averaged over the engine's steps.
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from corpus import corpus_token_ids  # benchmarks/corpus.py (this folder is on sys.path)

from pagedserve import LLM, BeamSearchParams, SamplingParams
from pagedserve.model.loader import load_tokenizer, resolve_model_path
from pagedserve.worker.model_runner import kv_block_bytes


def run_steps(llm: LLM) -> dict:
    """Step the engine until idle; peak blocks in use and the mean sharing saving over steps."""
    engine = llm.engine
    peak, savings = 0, []
    start = time.perf_counter()
    while engine.has_unfinished_requests():
        engine.step()
        physical = engine.kv_stats().used_blocks
        logical = sum(len(t) for t in engine.kv.block_tables.values())
        peak = max(peak, physical)
        if logical:
            savings.append(1 - physical / logical)
    return {"seconds": time.perf_counter() - start, "peak_blocks": peak,
            "mean_saving": sum(savings) / len(savings) if savings else 0.0}


def part_sampling(args, text_ids: list[int]) -> dict:
    prompt = {"prompt_token_ids": (text_ids * 4)[:args.prompt_tokens]}
    llm = LLM("smollm2-135m", enable_prefix_caching=False)
    llm.generate("warm-up", SamplingParams(max_tokens=2), use_tqdm=False)
    params = SamplingParams(n=4, temperature=0.8, seed=7, max_tokens=args.max_tokens, ignore_eos=True)
    llm.engine.add_request("shared", prompt, params)
    shared = run_steps(llm)
    for i in range(4):
        llm.engine.add_request(f"apart-{i}", prompt, SamplingParams(temperature=0.8, seed=7 + i,
                                                                     max_tokens=args.max_tokens, ignore_eos=True))
    apart = run_steps(llm)
    out = {"prompt_tokens": args.prompt_tokens, "n": 4, "max_tokens": args.max_tokens, "shared": shared,
           "separate": apart, "blocks_ratio": apart["peak_blocks"] / shared["peak_blocks"],
           "time_ratio": apart["seconds"] / shared["seconds"]}
    print(f"n=4 on a {args.prompt_tokens}-token prompt: peak blocks {shared['peak_blocks']} shared vs "
          f"{apart['peak_blocks']} as four requests ({out['blocks_ratio']:.2f}x fewer); "
          f"{shared['seconds']:.1f}s vs {apart['seconds']:.1f}s; mean sharing saving {shared['mean_saving']:.1%}")
    return out


def part_beam(args, text_ids: list[int]) -> dict:
    from transformers import AutoModelForCausalLM

    k = args.beam_width
    prompts = [text_ids[i * 37:i * 37 + 60 + 20 * (i % 4)] for i in range(args.beam_prompts)]
    params = BeamSearchParams(beam_width=k, max_tokens=args.max_tokens)
    llm = LLM("smollm2-135m")
    llm.beam_search({"prompt_token_ids": prompts[0][:8]}, BeamSearchParams(beam_width=2, max_tokens=2))  # warm-up
    llm.reset_prefix_cache()
    engine = llm.engine
    for i, p in enumerate(prompts):
        engine.add_request(f"beam-{i}", {"prompt_token_ids": p}, params)
    outputs: dict[str, list[int]] = {}
    peak, savings = 0, []
    start = time.perf_counter()
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                outputs[out.request_id] = out.outputs[0].token_ids
        physical = engine.kv_stats().used_blocks
        logical = sum(len(t) for t in engine.kv.block_tables.values())
        peak = max(peak, physical)
        if logical:
            savings.append(1 - physical / logical)
    ours_s = time.perf_counter() - start
    cfg = engine.model_config
    block_bytes = kv_block_bytes(cfg, engine.kv.block_size, engine.config.kv_cache_torch_dtype)

    path = resolve_model_path("smollm2-135m")
    hf = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()
    eos = cfg.eos_token_id
    hf_best, hf_peak_bytes = [], 0
    start = time.perf_counter()
    for p in prompts:
        ids = torch.tensor([p])
        with torch.no_grad():
            g = hf.generate(ids, attention_mask=torch.ones_like(ids), num_beams=k, do_sample=False,
                            max_new_tokens=args.max_tokens, eos_token_id=eos, pad_token_id=eos,
                            return_dict_in_generate=True)
        cache = g.past_key_values
        layers = getattr(cache, "layers", None)
        tensors = ([t for layer in layers for t in (layer.keys, layer.values)] if layers is not None
                   else [t for kv in cache for t in kv])
        hf_peak_bytes = max(hf_peak_bytes, sum(t.numel() * t.element_size() for t in tensors))
        row = g.sequences[0, len(p):].tolist()
        while row and row[-1] == eos and len(row) > 1 and row[-2] == eos:  # padding after the EOS
            row.pop()
        hf_best.append(row)
    hf_s = time.perf_counter() - start
    same = sum(outputs[f"beam-{i}"] == hf_best[i] for i in range(len(prompts)))
    tokens = sum(len(outputs[f"beam-{i}"]) for i in range(len(prompts)))
    out = {"beam_width": k, "prompts": len(prompts), "max_tokens": args.max_tokens,
           "pagedserve_seconds": ours_s, "hf_seconds": hf_s, "speedup": hf_s / ours_s,
           "best_beam_tokens": tokens, "same_best_beam": same,
           "pagedserve_peak_kv_mb": peak * block_bytes / 2**20,
           "hf_peak_kv_mb_one_prompt": hf_peak_bytes / 2**20, "mean_sharing_saving": sum(savings) / len(savings)}
    print(f"beam search k={k}, {len(prompts)} prompts, {args.max_tokens} tokens: pagedserve {ours_s:.1f}s "
          f"(all prompts batched) vs transformers {hf_s:.1f}s (one prompt at a time): {out['speedup']:.2f}x; "
          f"best beam equal on {same}/{len(prompts)}; peak KV {out['pagedserve_peak_kv_mb']:.1f} MiB for all "
          f"{len(prompts)} prompts vs transformers {out['hf_peak_kv_mb_one_prompt']:.1f} MiB for one; "
          f"sharing saves {out['mean_sharing_saving']:.1%} of the blocks (mean over steps)")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--parts", default="sampling,beam")
    ap.add_argument("--prompt-tokens", type=int, default=1000)
    ap.add_argument("--beam-prompts", type=int, default=8)
    ap.add_argument("--beam-width", type=int, default=4)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    text_ids = corpus_token_ids(load_tokenizer(resolve_model_path("smollm2-135m")))
    results = {}
    if "sampling" in args.parts:
        results["sampling"] = part_sampling(args, text_ids)
    if "beam" in args.parts:
        results["beam"] = part_beam(args, text_ids)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
