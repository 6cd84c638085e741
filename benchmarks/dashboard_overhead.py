"""What the live page costs the engine: the 64-request workload (throughput.py's W64: real text, prompts of
20–200 tokens, max_tokens 10–300, greedy, ignore_eos) sent all at once over HTTP to one `pagedserve serve`
at 64 seats, three ways in rotation, several times: no page open ("closed"); the page's stream read by a
plain client ("stream": what the server pays for the page, snapshots and events); and /dashboard open in
headless Chromium on this same machine ("page": the stream plus the browser's own CPU, whose seconds are
reported). Medians and ratios to "closed". With --offline it measures the step observers instead (the
history and request traces a served engine keeps even with no page open): `LLM.generate` with and
without them.

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
import threading
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
    modes = ("closed", "stream", "page")
    figures: dict[str, list[float]] = {m: [] for m in modes}
    try:
        wait_for(lambda: _healthy(base), 180, "the server")
        asyncio.run(run_load(base, args.model, work))  # warm-up: a whole run (the first one is slower)
        for i in range(args.runs):
            for mode in modes[i % 3:] + modes[:i % 3]:  # rotate the order: no mode always goes first
                driver = reader = None
                stop = threading.Event()
                events = [0]
                if mode == "stream":
                    reader = threading.Thread(target=read_stream, args=(base, stop, events))
                    reader.start()
                elif mode == "page":
                    driver = headless_chromium()
                    driver.get(f"{base}/dashboard")
                    wait_for(lambda d=driver: int(d.find_element("id", "blockmap").get_attribute("data-updates") or 0)
                             >= 2, 60, "the page")
                    browser_cpu = cpu_seconds(driver.service.process.pid)
                try:
                    # every run starts from an empty prefix cache (the same prompts would hit it after run one)
                    httpx.post(f"{base}/reset_prefix_cache", timeout=30).raise_for_status()
                    tokens, seconds = asyncio.run(run_load(base, args.model, work))
                    row = {"mode": mode, "tok_s": round(tokens / seconds, 1), "tokens": tokens,
                           "seconds": round(seconds, 2)}
                    if driver is not None:
                        row["page_updates"] = int(driver.find_element("id", "blockmap").get_attribute("data-updates"))
                        row["browser_cpu_s"] = round(cpu_seconds(driver.service.process.pid) - browser_cpu, 2)
                    if reader is not None:
                        row["stream_events"] = events[0]
                finally:
                    stop.set()
                    if driver is not None:
                        driver.quit()
                    if reader is not None:
                        reader.join(30)
                figures[mode].append(tokens / seconds)
                print(json.dumps(row), flush=True)
    finally:
        proc.terminate()
        proc.wait(60)
    return figures


def read_stream(base: str, stop: threading.Event, events: list[int]) -> None:
    """Read /dashboard/stream as a page would, counting its events, until `stop`."""
    with httpx.stream("GET", f"{base}/dashboard/stream", timeout=60) as r:
        for line in r.iter_lines():
            if line.startswith("event: snapshot"):
                events[0] += 1
            if stop.is_set():
                return


def cpu_seconds(root_pid: int) -> float:
    """User + system CPU seconds of a process and all its descendants (the browser's processes)."""
    import psutil

    total = 0.0
    procs = [psutil.Process(root_pid)]
    procs += procs[0].children(recursive=True)
    for p in procs:
        try:
            t = p.cpu_times()
            total += t.user + t.system + t.children_user + t.children_system
        except psutil.NoSuchProcess:
            pass
    return total


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
            llm.reset_prefix_cache()
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
    ap.add_argument("--runs", type=int, default=3, help="rounds (each runs every mode once, in a rotating order)")
    ap.add_argument("--interval", type=float, default=0.5, help="the page's --dashboard-interval")
    ap.add_argument("--offline", action="store_true", help="measure the step observers, not the page")
    args = ap.parse_args()
    tokenizer = load_tokenizer(resolve_model_path(args.model))
    work = make_workload(tokenizer, 64, 0)
    figures = offline(args, work) if args.offline else served(args, work)
    base = next(iter(figures))
    med = {k: statistics.median(v) for k, v in figures.items()}
    print(json.dumps({"median_tok_s": {k: round(v, 1) for k, v in med.items()},
                      "ratio_to_" + base: {k: round(v / med[base], 4) for k, v in med.items() if k != base},
                      "runs": {k: [round(x, 1) for x in v] for k, v in figures.items()}}))


if __name__ == "__main__":
    main()
