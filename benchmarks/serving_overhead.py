"""What the HTTP front end costs: the same requests offline (`LLM.generate`) and through `pagedserve
serve`, streamed and not, in one invocation, one system at a time (never two torch processes at once).

Workloads:
- w64: throughput.py's 64 requests (prompts of 20–200 tokens sent as token ids, max_tokens 10–300,
  greedy, ignore_eos), all at once, 64 seats;
- chapter16: the chapter's templates (48 requests, output lengths 0.25x), all at once, 16 seats.

Modes: offline; plain (HTTP, not streamed); stream (every request streamed, with usage); streamN (the
same against a server started with --stream-interval N).

For the server it also reads each thread's CPU time from /proc: the main thread runs the event loop
(HTTP, JSON, SSE), the other threads the engine (its loop thread and PyTorch's OpenMP workers, whose
spin-waits count too); and the load generator's own CPU time (it shares the two cores; its streaming
reader keeps only the stream's tail, where the usage chunk is, rather than parsing every event). So
it shows how the front end's cycles compare to the engine's.

    .venv/bin/python benchmarks/serving_overhead.py [--workloads w64,chapter16] [--runs 3]
                                                    [--modes offline,plain,stream,stream4]
                                                    [--json bench-results/serving-overhead.json]
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx
from throughput import make_workload  # benchmarks/ is on sys.path when run as a script

from pagedserve import LLM, SamplingParams
from pagedserve.bench.runners.openai_client import parse_sse_line
from pagedserve.bench.workloads import chapter_workload
from pagedserve.model.loader import load_tokenizer, resolve_model_path

CLK_TCK = os.sysconf("SC_CLK_TCK")


def workload(name: str, tokenizer) -> tuple[list[list[int] | str], list[int], int]:
    """(prompts, max_tokens, seats)."""
    if name == "w64":
        work = make_workload(tokenizer, 64, 0)
        return [ids for ids, _ in work], [m for _, m in work], 64
    if name == "chapter16":
        w = chapter_workload(48, seed=0, max_tokens_scale=0.25)
        return [r.prompt for r in w.requests], [r.max_tokens for r in w.requests], 16
    raise ValueError(f"unknown workload {name!r}: w64 or chapter16")


def run_offline(prompts, max_tokens, seats: int) -> dict:
    llm = LLM("smollm2-135m", max_num_seqs=seats)
    params = [SamplingParams(temperature=0, max_tokens=m, ignore_eos=True) for m in max_tokens]
    as_inputs = [p if isinstance(p, str) else {"prompt_token_ids": p} for p in prompts]
    llm.generate(as_inputs[:2], params[:2], use_tqdm=False)  # warm-up
    start = time.perf_counter()
    outs = llm.generate(as_inputs, params, use_tqdm=False)
    elapsed = time.perf_counter() - start
    tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    del llm
    gc.collect()
    return {"tokens": tokens, "seconds": elapsed, "tok_per_s": tokens / elapsed}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def thread_cpu(pid: int) -> dict[int, float]:
    """CPU seconds (user + system) of every thread of `pid` and of its child processes' threads."""
    out: dict[int, float] = {}
    pids = [pid] + child_pids(pid)
    for p in pids:
        try:
            tids = os.listdir(f"/proc/{p}/task")
        except FileNotFoundError:
            continue
        for tid in tids:
            try:
                fields = Path(f"/proc/{p}/task/{tid}/stat").read_text().rsplit(")", 1)[1].split()
            except FileNotFoundError:
                continue
            out[int(tid)] = (int(fields[11]) + int(fields[12])) / CLK_TCK
    return out


def child_pids(pid: int) -> list[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except FileNotFoundError:
        return []
    return [int(c) for c in text.split()]


async def post_one(client: httpx.AsyncClient, prompt, max_tokens: int, stream: bool) -> int:
    body = {"model": "smollm2-135m", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
            "ignore_eos": True, "stream": stream}
    if not stream:
        resp = await client.post("/v1/completions", json=body)
        resp.raise_for_status()
        return resp.json()["usage"]["completion_tokens"]
    body["stream_options"] = {"include_usage": True}
    # A lean reader: the engine's throughput is what is measured, so the client only keeps the tail of
    # the stream, where the usage chunk is, instead of parsing every event (it shares the two cores).
    tail = b""
    async with client.stream("POST", "/v1/completions", json=body) as resp:
        resp.raise_for_status()
        async for data in resp.aiter_bytes():
            tail = (tail + data)[-8192:]
    events = [parse_sse_line(line) for line in tail.decode(errors="replace").splitlines()[-6:]]
    usage = [e["usage"] for e in events if isinstance(e, dict) and e.get("usage")]
    return usage[-1]["completion_tokens"] if usage else 0


async def drive(url: str, prompts, max_tokens, stream: bool, stagger_s: float) -> tuple[int, float]:
    """All requests at once, each sent `stagger_s` after the previous one so that they reach the
    server's queue in the workload's order, as offline `generate` queues them: with fewer seats than
    requests, which ones start first decides the run's length, whatever the front end costs."""
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as client:
        await post_one(client, prompts[0], 4, stream)  # warm-up

        async def one(i: int, prompt, n: int) -> int:
            await asyncio.sleep(i * stagger_s)  # the arrival order, not compute
            return await post_one(client, prompt, n, stream)

        start = time.perf_counter()
        counts = await asyncio.gather(*(one(i, p, m) for i, (p, m) in enumerate(zip(prompts, max_tokens,
                                                                                      strict=True))))
        return sum(counts), time.perf_counter() - start


def run_server(prompts, max_tokens, seats: int, modes: list[str], extra: list[str],
               stagger_s: float) -> dict[str, dict]:
    port = free_port()
    cmd = [sys.executable, "-m", "pagedserve.entrypoints.cli", "serve", "--port", str(port),
           "--max-num-seqs", str(seats), "--log-level", "warning", *extra]
    proc = subprocess.Popen(cmd)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if proc.poll() is not None:
                raise RuntimeError(f"server exited with {proc.returncode}")
            time.sleep(0.5)
        results = {}
        for mode in modes:
            before = thread_cpu(proc.pid)
            client_before = time.process_time()
            tokens, seconds = asyncio.run(drive(url, prompts, max_tokens, mode == "stream", stagger_s))
            client = time.process_time() - client_before
            after = thread_cpu(proc.pid)
            front = after.get(proc.pid, 0.0) - before.get(proc.pid, 0.0)
            total = sum(after.values()) - sum(before.get(t, 0.0) for t in after)
            results[mode] = {"tokens": tokens, "seconds": seconds, "tok_per_s": tokens / seconds,
                             "front_end_cpu_s": front, "engine_cpu_s": total - front, "client_cpu_s": client}
        return results
    finally:
        proc.terminate()
        proc.wait(60)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workloads", default="w64,chapter16")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--server-arg", action="append", default=[], help="extra `pagedserve serve` argument")
    ap.add_argument("--modes", default="offline,plain,stream",
                    help="which of offline, plain, stream, streamN (a server with --stream-interval N) to run")
    ap.add_argument("--stagger-ms", type=float, default=2.0, help="gap between two requests' sends over HTTP")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    tokenizer = load_tokenizer(resolve_model_path("smollm2-135m"))
    stagger = args.stagger_ms / 1000
    report: dict[str, list] = {}
    for name in args.workloads.split(","):
        prompts, max_tokens, seats = workload(name, tokenizer)
        runs = []
        modes = args.modes.split(",")
        served = [m for m in modes if m != "offline"]
        for i in range(args.runs):
            row = {"offline": run_offline(prompts, max_tokens, seats)} if "offline" in modes else {}
            default = [m for m in served if m in ("plain", "stream")]
            if default:
                row.update(run_server(prompts, max_tokens, seats, default, args.server_arg, stagger))
            for m in served:
                if m.startswith("stream") and m != "stream":  # streamN: a server with --stream-interval N
                    extra = [*args.server_arg, "--stream-interval", m.removeprefix("stream")]
                    row.update({m: run_server(prompts, max_tokens, seats, ["stream"], extra, stagger)["stream"]})
            runs.append(row)
            off = row["offline"]["tok_per_s"] if "offline" in row else float("nan")
            print(f"{name} run {i + 1}: offline {off:.1f} tok/s, "
                  + ", ".join(f"{m} {row[m]['tok_per_s']:.1f} ({row[m]['tok_per_s'] / off:.3f}x; front end "
                              f"{row[m]['front_end_cpu_s']:.1f} s CPU, engine {row[m]['engine_cpu_s']:.1f} s, "
                              f"client {row[m]['client_cpu_s']:.1f} s)"
                              for m in served), flush=True)
        report[name] = runs
        med = {m: statistics.median(r[m]["tok_per_s"] for r in runs) for m in modes}
        line = ", ".join(f"{m} {med[m]:.1f}" for m in modes)
        if "offline" in modes:
            line += "; ratios " + ", ".join(
                f"{m} {statistics.median(r[m]['tok_per_s'] / r['offline']['tok_per_s'] for r in runs):.3f}x"
                for m in served)
        print(f"{name} medians: {line}", flush=True)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
