"""The README's picture of the live page: `pagedserve serve` on the default model under a mixed load
(three tenants whose requests share a long system prompt, some with n = 2, all streamed), /dashboard in
headless Chromium, one request's timeline open; saved as a small palette PNG.

    .venv/bin/python benchmarks/dashboard_screenshot.py [--out docs/img/dashboard.png]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
from PIL import Image

from pagedserve.bench.browser import headless_chromium, wait_for

PORT = 8792
TENANTS = [
    "You are a patient gardening assistant. Answer in short practical steps, name the season for each task, "
    "and warn about the common mistakes beginners make with soil, water and light. ",
    "You are a careful support agent for a bicycle shop. Ask for the bike's model when it matters, explain "
    "repairs in plain words, and say when a job needs a mechanic rather than a home fix. ",
    "You are a history tutor. Give dates, name the people involved, and end every answer with one question "
    "that checks the student understood the causes, not only the events. ",
]
QUESTIONS = ["What should I do first?", "Explain it again, more simply.", "What goes wrong most often?",
             "How long does it take?", "Give me an example.", "What would you do next?"]


def load(base: str, stop: threading.Event, tenant: int) -> None:
    i = 0
    while not stop.is_set():
        body = {"model": "smollm2-135m", "prompt": TENANTS[tenant] + QUESTIONS[i % len(QUESTIONS)],
                "max_tokens": 160, "temperature": 0.8, "seed": i, "n": 2 if i % 3 == 0 else 1, "stream": True,
                "ignore_eos": True}
        try:
            with httpx.stream("POST", f"{base}/v1/completions", json=body, timeout=120) as r:
                for _ in r.iter_lines():
                    if stop.is_set():
                        break
        except httpx.HTTPError:
            pass
        i += 1


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="docs/img/dashboard.png")
    ap.add_argument("--colors", type=int, default=96, help="palette size of the saved PNG")
    args = ap.parse_args()
    base = f"http://127.0.0.1:{PORT}"
    proc = subprocess.Popen([sys.executable, "-m", "pagedserve.entrypoints.cli", "serve", "--model", "smollm2-135m",
                             "--port", str(PORT), "--max-num-seqs", "24", "--kv-cache-memory-gb", "0.25",
                             "--log-level", "warning"])
    stop = threading.Event()
    workers = [threading.Thread(target=load, args=(base, stop, k % len(TENANTS))) for k in range(18)]
    driver = None
    try:
        wait_for(lambda: _healthy(base), 180, "the server")
        for w in workers:
            w.start()
        time.sleep(20)  # let the map fill and the charts gather a few seconds of history
        driver = headless_chromium(1400, 1400)
        driver.get(f"{base}/dashboard")
        wait_for(lambda: int(driver.find_element("id", "blockmap").get_attribute("data-updates") or 0) >= 4, 60,
                 "the page")
        driver.execute_script("document.querySelector('#queues table[data-queue=running] tr.req').click()")
        time.sleep(12)
        png = Path(args.out)
        png.parent.mkdir(parents=True, exist_ok=True)
        raw = png.with_suffix(".raw.png")
        driver.save_screenshot(str(raw))
        Image.open(raw).convert("RGB").quantize(colors=args.colors).save(png, optimize=True)
        raw.unlink()
        print(f"{png}: {png.stat().st_size} bytes")
    finally:
        stop.set()
        if driver is not None:
            driver.quit()
        proc.terminate()
        proc.wait(60)
        for w in workers:
            w.join(5)


def _healthy(base: str) -> bool:
    try:
        return httpx.get(f"{base}/health", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


if __name__ == "__main__":
    main()
