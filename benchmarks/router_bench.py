"""The router's balancing policies on a multi-tenant prefix workload, and the router's own overhead.

Workload: `--groups` tenants, each with its own long system prompt (about `--prefix-tokens` tokens of
offline reference text, a different slice per tenant), each request that prompt plus a short question
of its own; the tenants' requests are interleaved (seeded shuffle) and sent with Poisson arrivals at
`--rate` (or all at once with --rate 0), streamed, `--max-tokens` each.

1. Policies: two `pagedserve serve` replicas (the CPU threads split between them), one router per
   policy in front of them; before each policy the replicas' prefix caches are reset (cold start).
   Per policy: prefix-cache hit rate (cached prompt tokens over prompt tokens, from each response's
   usage.prompt_tokens_details.cached_tokens), TTFT p50/p95, output tok/s, req/s, and the oracle's hit
   rate (every tenant's requests after its first served from a cache holding its whole prefix).
2. Overhead: one replica, the same workload sent to it directly and through a router (round_robin),
   alternating `--overhead-runs` times; throughput and TTFT p50 of each.

    .venv/bin/python benchmarks/router_bench.py [--model smollm2-135m] [--groups 8] [--requests 64]
        [--prefix-tokens 1000] [--rate 2] [--policies round_robin,least_loaded,cache_aware,kv_aware]
        [--serve-args "..."] [--json bench-results/router.json]

A tiny check of the script itself (seconds, a random-weight model folder):
    .venv/bin/python benchmarks/router_bench.py --model /path/to/tiny --groups 2 --requests 8 \\
        --prefix-tokens 100 --max-tokens 4 --rate 0 --overhead-runs 1
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import shlex
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

from pagedserve.bench.metrics import percentile
from pagedserve.bench.text_source import reference_lines, take_tokens

QUESTIONS = ["What is the main point of the text above?", "Summarize the second paragraph.",
             "Which term in it is the hardest to explain?", "Give an example of what it describes.",
             "What would a beginner misunderstand here?", "List three keywords of the text.",
             "Rewrite its first sentence more simply.", "What question does the text leave open?"]


@dataclass
class Req:
    group: int
    prompt: str


@dataclass
class Result:
    group: int
    ttft: float
    latency: float
    prompt_tokens: int
    cached_tokens: int
    output_tokens: int


def make_workload(groups: int, requests: int, prefix_tokens: int, seed: int) -> tuple[list[str], list[Req]]:
    _, lines = reference_lines()
    rng = random.Random(seed)
    systems = [f"You are the assistant of tenant {g}. Answer from this reference only.\n"
               + take_tokens(lines, g * 97, prefix_tokens) + "\n" for g in range(groups)]
    reqs = [Req(i % groups, systems[i % groups] + f"Question {i}: {QUESTIONS[i % len(QUESTIONS)]}")
            for i in range(requests)]
    rng.shuffle(reqs)
    return systems, reqs


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def process(cmd: list[str], url: str, log: Path, timeout: float = 300.0):
    """A server process, up once its /health answers 200; SIGTERM (then SIGKILL) on exit."""
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"{cmd[3]} exited with {proc.returncode}; log: {log}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise TimeoutError(f"{url} not ready; log: {log}")
            time.sleep(0.3)
        yield url
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def serve_cmd(args: argparse.Namespace, port: int, threads: int) -> list[str]:
    return [sys.executable, "-m", "pagedserve.entrypoints.cli", "serve", "--model", args.model, "--host", "127.0.0.1",
            "--port", str(port), "--num-threads", str(threads), "--log-level", "warning", *shlex.split(args.serve_args)]


def router_cmd(port: int, backends: list[str], policy: str) -> list[str]:
    return [sys.executable, "-m", "pagedserve.entrypoints.cli", "router", "--host", "127.0.0.1", "--port", str(port),
            "--policy", policy, "--log-level", "warning", *[a for b in backends for a in ("--backend", b)]]


async def one(client: httpx.AsyncClient, url: str, model: str, r: Req, max_tokens: int) -> Result:
    body = {"model": model, "prompt": r.prompt, "max_tokens": max_tokens, "ignore_eos": True, "temperature": 0,
            "stream": True, "stream_options": {"include_usage": True}}
    start = time.perf_counter()
    ttft = None
    usage = None
    async with client.stream("POST", f"{url}/v1/completions", json=body) as resp:
        resp.raise_for_status()
        async for line in resp.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if ttft is None and chunk.get("choices") and chunk["choices"][0].get("text"):
                ttft = time.perf_counter() - start
            if chunk.get("usage"):
                usage = chunk["usage"]
    end = time.perf_counter() - start
    assert usage is not None, "the stream carried no usage"
    cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0
    return Result(r.group, ttft if ttft is not None else end, end, usage["prompt_tokens"], cached,
                  usage["completion_tokens"])


async def run_load(url: str, model: str, reqs: list[Req], rate: float, max_tokens: int, seed: int) -> dict:
    rng = random.Random(seed)
    async with httpx.AsyncClient(timeout=600) as client:
        tasks = []
        start = time.perf_counter()
        for r in reqs:
            tasks.append(asyncio.create_task(one(client, url, model, r, max_tokens)))
            if rate > 0:
                await asyncio.sleep(rng.expovariate(rate))
        results = await asyncio.gather(*tasks)
        duration = time.perf_counter() - start
    ttfts = [x.ttft for x in results]
    prompt = sum(x.prompt_tokens for x in results)
    return {"requests": len(results), "duration_s": duration,
            "hit_rate": sum(x.cached_tokens for x in results) / prompt if prompt else 0.0,
            "ttft_p50_ms": 1000 * percentile(ttfts, 50), "ttft_p95_ms": 1000 * percentile(ttfts, 95),
            "output_tok_s": sum(x.output_tokens for x in results) / duration, "req_s": len(results) / duration,
            "results": results}


def oracle_hit_rate(results: list[Result], prefix_tokens: dict[int, int], block_size: int) -> float:
    """Every request after its tenant's first finds the whole prefix (in full blocks) cached."""
    seen: set[int] = set()
    hits = 0
    for x in results:
        if x.group in seen:
            hits += prefix_tokens[x.group] // block_size * block_size
        seen.add(x.group)
    total = sum(x.prompt_tokens for x in results)
    return hits / total if total else 0.0


def model_name(url: str) -> str:
    return httpx.get(f"{url}/v1/models", timeout=10).json()["data"][0]["id"]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--groups", type=int, default=8)
    p.add_argument("--requests", type=int, default=64)
    p.add_argument("--prefix-tokens", type=int, default=1000)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--rate", type=float, default=2.0, help="requests/s (Poisson); 0 = all at once")
    p.add_argument("--policies", default="round_robin,least_loaded,cache_aware,kv_aware")
    p.add_argument("--serve-args", default="", help="more `pagedserve serve` options for the replicas")
    p.add_argument("--overhead-runs", type=int, default=2, help="direct/router pairs (0: skip the overhead part)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None)
    args = p.parse_args()
    policies = [x for x in args.policies.split(",") if x]
    systems, reqs = make_workload(args.groups, args.requests, args.prefix_tokens, args.seed)
    logs = Path(os.environ.get("TMPDIR", "/tmp")) / f"router-bench-{os.getpid()}"
    logs.mkdir(parents=True, exist_ok=True)
    cores = os.cpu_count() or 2
    out: dict = {"config": {k: v for k, v in vars(args).items() if k != "json"}, "policies": {}, "overhead": []}

    ports = [free_port(), free_port()]
    urls = [f"http://127.0.0.1:{port}" for port in ports]
    with contextlib.ExitStack() as stack:
        for i, port in enumerate(ports):
            stack.enter_context(process(serve_cmd(args, port, max(1, cores // 2)), urls[i], logs / f"replica{i}.log"))
        model = model_name(urls[0])
        block_size = httpx.get(f"{urls[0]}/kv_events", params={"since": "-1"}, timeout=10).json()["block_size"]
        prefix_tokens = {g: len(httpx.post(f"{urls[0]}/tokenize", json={"prompt": s}, timeout=30).json()["tokens"])
                         for g, s in enumerate(systems)}
        for policy in policies:
            for u in urls:
                httpx.post(f"{u}/reset_prefix_cache", timeout=30).raise_for_status()
            port = free_port()
            with process(router_cmd(port, urls, policy), f"http://127.0.0.1:{port}", logs / f"router-{policy}.log"):
                run = asyncio.run(run_load(f"http://127.0.0.1:{port}", model, reqs, args.rate, args.max_tokens,
                                           args.seed))
            run["oracle_hit_rate"] = oracle_hit_rate(run.pop("results"), prefix_tokens, block_size)
            out["policies"][policy] = run
            print(f"{policy:>13}: hit rate {run['hit_rate']:.1%} (oracle {run['oracle_hit_rate']:.1%}), "
                  f"TTFT p50 {run['ttft_p50_ms']:.0f} ms p95 {run['ttft_p95_ms']:.0f} ms, "
                  f"{run['output_tok_s']:.1f} tok/s, {run['req_s']:.2f} req/s", flush=True)

    if args.overhead_runs:
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        with process(serve_cmd(args, port, cores), url, logs / "replica-alone.log"):
            rport = free_port()
            with process(router_cmd(rport, [url], "round_robin"), f"http://127.0.0.1:{rport}",
                         logs / "router-overhead.log"):
                for i in range(args.overhead_runs):
                    for name, target in (("direct", url), ("router", f"http://127.0.0.1:{rport}")):
                        httpx.post(f"{url}/reset_prefix_cache", timeout=30).raise_for_status()
                        run = asyncio.run(run_load(target, model, reqs, args.rate, args.max_tokens, args.seed))
                        run.pop("results")
                        out["overhead"].append({"run": i, "path": name, **run})
                        print(f"overhead run {i} {name:>6}: TTFT p50 {run['ttft_p50_ms']:.1f} ms, "
                              f"{run['output_tok_s']:.1f} tok/s", flush=True)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
