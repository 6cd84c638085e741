"""What the live page costs the engine: the 64-request workload (throughput.py's W64: real text, prompts of
20–200 tokens, max_tokens 10–300, greedy, ignore_eos) sent all at once over HTTP to one `pagedserve serve`
at 64 seats, with /dashboard open in headless Chromium and with no page open, alternating, several
times; medians and their ratio. With --offline it measures the step observers instead (the history and
request traces a served engine keeps even with no page open): `LLM.generate` with and without them.

    .venv/bin/python benchmarks/dashboard_overhead.py [--runs 3] [--interval 0.5] [--model smollm2-135m]
    .venv/bin/python benchmarks/dashboard_overhead.py --offline [--runs 3]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from throughput import make_workload  # noqa: E402

from pagedserve.bench.browser import headless_chromium, wait_for  # noqa: E402
from pagedserve.model.loader import load_tokenizer, resolve_model_path  # noqa: E402

PORT = 8791


async def run_load(base: str, model: str, work: list[tuple[list[int], int]]) -> tuple[int, float]:
    """Every request at once; (output tokens, seconds)."""
    async with httpx.AsyncClient(base_url=base, timeout=600, limits=httpx.Limits(max_connections=128)) as client:
        async def one(prompt: list[int], max_tokens: int) -> int:
            r = await client.post("/v1/completions", json={"model": model, "prompt": prompt, "max_tokens": max_tokens,
                                                           "temperature": 0, "ignore_eos": True})
            r.raise_for_status()
            return r.json()["usage"]["completion_tokens"]

        start = time.perf_counter()
        tokens = await asyncio.gather(*(one(p, n) for p, n in work))
        return sum(tokens), time.perf_counter() - start


def served(args, work) -> dict:
    base = f"http://127.0.0.1:{PORT}"
    cmd = [sys.executable, "-m", "pagedserve.entrypoints.cli", "serve", "--model", args.model, "--port", str(PORT),
           "--max-num-seqs", "64", "--dashboard-interval", str(args.interval), "--log-level", "warning"]
    proc = subprocess.Popen(cmd)
    figures: dict[str, list[float]] = {"closed": [], "open": []}
    try:
        wait_for(lambda: _healthy(base), 180, "the server")
        asyncio.run(run_load(base, args.model, work[:8]))  # warm-up
        for i in range(args.runs):
            for mode in ("closed", "open") if i % 2 == 0 else ("open", "closed"):
                driver = None
                if mode == "open":
                    driver = headless_chromium()
                    driver.get(f"{base}/dashboard")
                    wait_for(lambda d=driver: int(d.find_element("id", "blockmap").get_attribute("data-updates") or 0)
                             >= 2, 60, "the page")
                try:
                    tokens, seconds = asyncio.run(run_load(base, args.model, work))
                    updates = (int(driver.find_element("id", "blockmap").get_attribute("data-updates"))
                               if driver else 0)
                finally:
                    if driver is not None:
                        driver.quit()
                figures[mode].append(tokens / seconds)
                print(json.dumps({"mode": mode, "tok_s": round(tokens / seconds, 1), "tokens": tokens,
                                  "seconds": round(seconds, 2), "page_updates": updates}), flush=True)
    finally:
        proc.terminate()
        proc.wait(60)
    return figures


def _healthy(base: str) -> bool:
    try:
        return httpx.get(f"{base}/health", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def offline(args, work) -> dict:
    from pagedserve import LLM, SamplingParams

    figures: dict[str, list[float]] = {"without": [], "with": []}
    prompts = [{"prompt_token_ids": p} for p, _ in work]
    params = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for _, n in work]
    for i in range(args.runs):
        for mode in ("without", "with") if i % 2 == 0 else ("with", "without"):
            llm = LLM(args.model, max_num_seqs=64)
            if mode == "with":
                llm.engine.enable_live_view()
            llm.generate(prompts[:4], params[:4], use_tqdm=False)  # warm-up
            start = time.perf_counter()
            outs = llm.generate(prompts, params, use_tqdm=False)
            seconds = time.perf_counter() - start
            tokens = sum(len(o.outputs[0].token_ids) for o in outs)
            figures[mode].append(tokens / seconds)
            print(json.dumps({"observers": mode, "tok_s": round(tokens / seconds, 1), "seconds": round(seconds, 2)}),
                  flush=True)
            del llm
    return figures


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--runs", type=int, default=3, help="pairs of runs (alternating order)")
    ap.add_argument("--interval", type=float, default=0.5, help="the page's --dashboard-interval")
    ap.add_argument("--offline", action="store_true", help="measure the step observers, not the page")
    args = ap.parse_args()
    tokenizer = load_tokenizer(resolve_model_path(args.model))
    work = make_workload(tokenizer, 64, 0)
    figures = offline(args, work) if args.offline else served(args, work)
    (a, b) = figures
    med = {k: statistics.median(v) for k, v in figures.items()}
    print(json.dumps({"median_tok_s": {k: round(v, 1) for k, v in med.items()},
                      "ratio": round(med[b] / med[a], 4), "runs": {k: [round(x, 1) for x in v] for k, v in figures.items()}}))


if __name__ == "__main__":
    main()
