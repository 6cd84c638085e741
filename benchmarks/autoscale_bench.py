"""An autoscaling run: `pagedserve router --autoscale` under a load that steps up then down, with the
replica count, the replicas' queue depth and the p95 latency over time, as JSON and a plot.

The load is closed-loop clients (each sends its next request when the last one is answered); `--phases`
gives each phase's seconds and client count, e.g. "20:1,60:12,60:1" (a quiet start, a burst, quiet).
Every 0.5 s it samples the router's /router/backends (replicas serving, starting and draining, summed
vllm:num_requests_waiting) and the p95 of the latencies finished in the last 10 s.

    .venv/bin/python benchmarks/autoscale_bench.py [--model smollm2-135m] [--phases 20:1,60:12,60:1]
        [--max-replicas 2] [--serve-args "..."] [--out bench-results/autoscale]

A tiny check of the script itself (about a minute, a random-weight model folder):
    .venv/bin/python benchmarks/autoscale_bench.py --model /path/to/tiny --phases 3:1,15:8,15:0 \\
        --max-tokens 150 --downscale-delay 3 --serve-args "--max-num-seqs 2 --num-blocks 256"
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx

from pagedserve.bench.metrics import percentile


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def parse_phases(text: str) -> list[tuple[float, int]]:
    phases = []
    for part in text.split(","):
        seconds, _, clients = part.partition(":")
        phases.append((float(seconds), int(clients)))
    if not phases or any(s <= 0 or c < 0 for s, c in phases):
        raise ValueError(f"--phases must be SECONDS:CLIENTS,... with seconds > 0 and clients >= 0, got {text!r}")
    return phases


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--phases", default="20:1,60:12,60:1")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--min-replicas", type=int, default=1)
    p.add_argument("--max-replicas", type=int, default=2)
    p.add_argument("--target-queue", type=float, default=1.0)
    p.add_argument("--upscale-delay", type=float, default=2.0)
    p.add_argument("--downscale-delay", type=float, default=15.0)
    p.add_argument("--serve-args", default="")
    p.add_argument("--out", default="bench-results/autoscale")
    args = p.parse_args()
    phases = parse_phases(args.phases)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "pagedserve.entrypoints.cli", "router", "--autoscale", "--model", args.model,
           "--port", str(port), "--min-replicas", str(args.min_replicas), "--max-replicas", str(args.max_replicas),
           "--target-queue", str(args.target_queue), "--upscale-delay", str(args.upscale_delay),
           "--downscale-delay", str(args.downscale_delay), "--autoscale-interval", "0.5",
           "--serve-args", args.serve_args, "--log-level", "info"]
    with open(out / "router.log", "wb") as log:
        router = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 300
        while True:
            if router.poll() is not None:
                raise RuntimeError(f"the router exited; log: {out / 'router.log'}")
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError("router not ready")
            time.sleep(0.5)
        model = httpx.get(f"{url}/v1/models", timeout=10).json()["data"][0]["id"]
        finished: list[tuple[float, float]] = []  # (end time, latency)
        failures: list[str] = []
        wanted = [0]  # clients that should be running now
        start = time.monotonic()

        def client(i: int) -> None:
            with httpx.Client(timeout=600) as c:
                while True:
                    if i >= wanted[0]:
                        if wanted[0] < 0:
                            return
                        time.sleep(0.05)
                        continue
                    t0 = time.monotonic()
                    r = c.post(f"{url}/v1/completions", json={"model": model, "prompt": f"Client {i} says",
                                                              "max_tokens": args.max_tokens, "ignore_eos": True})
                    if r.status_code != 200:
                        failures.append(f"{r.status_code} {r.text[:200]}")
                    finished.append((time.monotonic() - start, time.monotonic() - t0))

        most = max(c for _, c in phases)
        threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(most)]
        for t in threads:
            t.start()
        samples = []
        for seconds, clients in phases:
            wanted[0] = clients
            phase_end = time.monotonic() + seconds
            while time.monotonic() < phase_end:
                now = time.monotonic() - start
                backends = httpx.get(f"{url}/router/backends", timeout=10).json()
                recent = [lat for end, lat in list(finished) if end > now - 10]
                samples.append({"t": now, "clients": clients,
                                "serving": sum(b["healthy"] and not b["draining"] for b in backends),
                                "replicas": sum(not b["draining"] for b in backends),
                                "waiting": sum(b["num_waiting"] for b in backends),
                                "p95_s": percentile(recent, 95) if recent else None})
                time.sleep(0.5)
        wanted[0] = -1
        for t in threads:
            t.join(600)
    finally:
        router.send_signal(signal.SIGTERM)
        try:
            router.wait(120)
        except subprocess.TimeoutExpired:
            router.kill()
    result = {"config": vars(args), "samples": samples, "requests": len(finished), "failures": failures}
    (out / "autoscale.json").write_text(json.dumps(result, indent=2))
    plot(samples, out / "autoscale.png")
    print(f"{len(finished)} requests, {len(failures)} failed; replicas peaked at "
          f"{max(s['replicas'] for s in samples)}; {out / 'autoscale.json'}, {out / 'autoscale.png'}")
    return 0 if not failures else 1


def plot(samples: list[dict], path: Path) -> None:
    os.environ.setdefault("MPLBACKEND", "Agg")
    import matplotlib.pyplot as plt

    t = [s["t"] for s in samples]
    fig, axes = plt.subplots(3, 1, figsize=(8, 7), sharex=True)
    axes[0].step(t, [s["replicas"] for s in samples], where="post", label="replicas (not draining)")
    axes[0].step(t, [s["serving"] for s in samples], where="post", label="serving")
    axes[0].step(t, [s["clients"] for s in samples], where="post", label="clients", alpha=0.5)
    axes[0].legend(loc="upper right")
    axes[1].plot(t, [s["waiting"] for s in samples])
    axes[1].set_ylabel("requests waiting")
    axes[2].plot(t, [s["p95_s"] if s["p95_s"] is not None else float("nan") for s in samples])
    axes[2].set_ylabel("p95 latency (s, last 10 s)")
    axes[2].set_xlabel("seconds")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
