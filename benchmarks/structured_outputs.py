"""Structured outputs on vs off: the 64-request workload of throughput.py at 64 seats, greedy, each
request either free or constrained by its own JSON schema (64 distinct schemas, so every one is
compiled), with ignore_eos off so that constrained replies end when their JSON does. Prints output
tok/s both ways, step time p50 / p99 / max both ways (a compile on the step would show as a stalled
step: grammars compile on a worker thread instead), the per-schema compile times and the mask cost
per step.

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


def run(llm: LLM, prompts: list[dict], params: list[SamplingParams]) -> tuple[float, list[int], list[float]]:
    """(seconds, output length per request, step durations)."""
    engine = llm.engine
    assert llm.reset_prefix_cache()  # every pass prefills its prompts: no pass rides on the previous one's cache
    engine.step_records.clear()
    engine.record_steps = True
    start = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    seconds = time.perf_counter() - start
    engine.record_steps = False
    steps = [r.duration for r in engine.step_records if r.num_seqs]
    return seconds, [len(o.outputs[0].token_ids) for o in outs], steps


def step_summary(steps: list[float]) -> str:
    ranked = sorted(steps)
    p99 = ranked[min(len(ranked) - 1, round(0.99 * (len(ranked) - 1)))]
    return f"step p50 {statistics.median(steps) * 1e3:.1f} / p99 {p99 * 1e3:.1f} / max {ranked[-1] * 1e3:.1f} ms"


class MaskTimer:
    """Wraps the manager's apply to add up the time spent masking."""

    def __init__(self, manager) -> None:
        self.seconds, self.calls, self._apply = 0.0, 0, manager.apply
        manager.apply = self

    def __call__(self, *args) -> None:
        start = time.perf_counter()
        self._apply(*args)
        self.seconds += time.perf_counter() - start
        self.calls += 1


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    llm = LLM("smollm2-135m", max_num_seqs=64)
    work = make_workload(llm.get_tokenizer(), 64, 0)
    prompts = [{"prompt_token_ids": ids} for ids, _ in work]
    run(llm, prompts[:4], [SamplingParams(temperature=0, max_tokens=8)] * 4)  # warm-up
    timer = MaskTimer(llm.engine.core.structured_outputs())
    for r in range(args.runs):
        so = [SamplingParams(temperature=0, max_tokens=n,
                             structured_outputs=StructuredOutputsParams(json=schema(64 * r + i)))
              for i, (_, n) in enumerate(work)]
        timer.seconds, timer.calls = 0.0, 0
        t_on, lengths, steps_on = run(llm, prompts, so)
        mask_ms = timer.seconds / max(timer.calls, 1) * 1e3
        # the same output lengths without the grammar, so both runs decode the same number of tokens
        free = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in lengths]
        t_off, _, steps_off = run(llm, prompts, free)
        n_on = n_off = sum(lengths)
        print(f"run {r}: structured {n_on / t_on:.1f} tok/s ({n_on} tokens), free {n_off / t_off:.1f} tok/s "
              f"({n_off} tokens): {n_on / t_on / (n_off / t_off):.3f}x")
        print(f"  structured {step_summary(steps_on)}, mask {mask_ms:.2f} ms/step; free {step_summary(steps_off)}")
    compile_s = llm.engine.core.structured_outputs().compile_seconds
    if compile_s:
        print(f"grammar compile: {len(compile_s)} schemas, median {statistics.median(compile_s) * 1e3:.2f} ms, "
              f"max {max(compile_s) * 1e3:.2f} ms")


if __name__ == "__main__":
    main()
