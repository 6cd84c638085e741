"""A first look: a few chat prompts through the default model in one continuous batch."""

from __future__ import annotations

import time

from pagedserve import LLM, SamplingParams

QUESTIONS = [
    "What is the capital of France?",
    "Write a haiku about autumn leaves.",
    "Explain what a KV cache is in one paragraph.",
    "Give me three tips for learning a new programming language.",
    "What is 17 multiplied by 23?",
    "Describe the water cycle for a ten-year-old.",
]


def main() -> None:
    llm = LLM("smollm2-135m")
    params = SamplingParams(temperature=0, max_tokens=96)
    conversations = [[{"role": "user", "content": q}] for q in QUESTIONS]
    start = time.monotonic()
    outputs = llm.chat(conversations, params)
    elapsed = time.monotonic() - start
    tokens = 0
    for q, out in zip(QUESTIONS, outputs, strict=True):
        c = out.outputs[0]
        tokens += len(c.token_ids)
        print(f"\n### {q}\n{c.text.strip()}\n(finish={c.finish_reason}, tokens={len(c.token_ids)}, "
              f"ttft={out.metrics.ttft * 1000:.0f} ms)")
    print(f"\n{len(QUESTIONS)} requests in one continuous batch: {tokens} tokens in {elapsed:.1f}s "
          f"= {tokens / elapsed:.1f} tok/s")


if __name__ == "__main__":
    main()
