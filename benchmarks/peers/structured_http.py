"""Structured outputs on vs off over HTTP, against any OpenAI-compatible server that takes vLLM's
`structured_outputs` field (pagedserve, vLLM): the 64-request workload of throughput.py sent at once to
/v1/completions as token ids, greedy, each request constrained by its own JSON schema (distinct per
run, so each is compiled), then the same requests unconstrained with the output lengths the
constrained run produced (ignore_eos), so both passes decode the same number of tokens. Every pass's
prompts start with their own token, so no pass rides on the previous one's prefix cache.

    .venv/bin/python benchmarks/peers/structured_http.py --url http://127.0.0.1:8000 --model smollm2-135m
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from structured_outputs import schema  # noqa: E402  (benchmarks/structured_outputs.py)
from throughput import make_workload  # noqa: E402

from pagedserve.model.loader import load_tokenizer, resolve_model_path  # noqa: E402


def fresh(ids: list[int], pass_number: int) -> list[int]:
    """The prompt after a first token no other pass used: it starts from a cold prefix cache."""
    return [1000 + pass_number, *ids]


async def send_all(url: str, bodies: list[dict]) -> tuple[float, list[int], list[str]]:
    """(seconds, completion tokens, texts) of every body sent at once."""
    async with httpx.AsyncClient(base_url=url, timeout=1800) as client:
        start = time.perf_counter()
        replies = await asyncio.gather(*(client.post("/v1/completions", json=b) for b in bodies))
        seconds = time.perf_counter() - start
    for r in replies:
        r.raise_for_status()
    data = [r.json() for r in replies]
    return seconds, [d["usage"]["completion_tokens"] for d in data], [d["choices"][0]["text"] for d in data]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", required=True)
    ap.add_argument("--model", required=True)
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--runs", type=int, default=2)
    ap.add_argument("--label", default="server")
    args = ap.parse_args()
    work = make_workload(load_tokenizer(resolve_model_path("smollm2-135m")), args.requests, 0)
    base = {"model": args.model, "temperature": 0}
    asyncio.run(send_all(args.url, [{**base, "prompt": ids, "max_tokens": 4} for ids, _ in work[:4]]))  # warm-up
    for r in range(args.runs):
        constrained = [{**base, "prompt": fresh(ids, 2 * r), "max_tokens": n,
                        "structured_outputs": {"json": schema(10_000 * (r + 1) + i)}}
                       for i, (ids, n) in enumerate(work)]
        t_on, lengths, texts = asyncio.run(send_all(args.url, constrained))
        valid = 0
        for text in texts:
            try:
                json.loads(text)
                valid += 1
            except json.JSONDecodeError:
                pass
        free = [{**base, "prompt": fresh(ids, 2 * r + 1), "max_tokens": n, "ignore_eos": True}
                for (ids, _), n in zip(work, lengths, strict=True)]
        t_off, free_lengths, _ = asyncio.run(send_all(args.url, free))
        on, off = sum(lengths) / t_on, sum(free_lengths) / t_off
        print(f"{args.label} run {r}: structured {on:.1f} tok/s ({sum(lengths)} tokens, {valid}/{len(texts)} "
              f"parse), free {off:.1f} tok/s ({sum(free_lengths)} tokens): {on / off:.3f}x", flush=True)


if __name__ == "__main__":
    main()
