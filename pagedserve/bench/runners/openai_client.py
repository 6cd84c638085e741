"""An async load generator for any OpenAI-compatible server (this project's, llama.cpp's llama-server,
vLLM): streaming /v1/completions with ignore_eos and temperature 0, so every server is measured by
the same code. Each SSE chunk that carries text is timestamped as it arrives.

Safety: only loopback URLs are accepted, the number of requests is capped, and the whole run is
bounded in time (requests still open at the deadline are cancelled and counted as errors).
"""

from __future__ import annotations

import asyncio
import json
import time
from urllib.parse import urlsplit

import httpx
from tqdm import tqdm

from pagedserve.bench.records import RequestRecord, RunResult
from pagedserve.bench.workloads import Workload, WorkloadRequest

LOCAL_HOSTS = {"127.0.0.1", "localhost", "::1"}
MAX_REQUESTS = 10_000


def check_local_url(url: str) -> str:
    """The base URL without a trailing /v1; refuses anything that is not this machine's loopback."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"url must look like http://127.0.0.1:PORT, got {url!r}")
    if parts.hostname not in LOCAL_HOSTS:
        raise ValueError(f"url host must be 127.0.0.1, localhost or ::1 (this machine), got {parts.hostname!r}")
    base = url.rstrip("/")
    return base[:-3] if base.endswith("/v1") else base


def completion_body(r: WorkloadRequest, model: str) -> dict:
    body = {"model": model, "prompt": r.prompt, "max_tokens": r.max_tokens, "temperature": r.temperature,
            "top_p": r.top_p, "stream": True, "ignore_eos": r.ignore_eos,
            "stream_options": {"include_usage": True}}
    if r.seed is not None:
        body["seed"] = r.seed
    return body


def parse_sse_line(line: str) -> dict | str | None:
    """One SSE line → its JSON payload, "[DONE]", or None for blanks, comments and other fields."""
    if not line.startswith("data:"):
        return None
    data = line[5:].strip()
    if not data:
        return None
    return data if data == "[DONE]" else json.loads(data)


def is_token_chunk(chunk: dict) -> bool:
    """A chunk that delivers generated text; a final chunk carrying only the finish reason (or usage) is not."""
    choices = chunk.get("choices") or []
    if not choices:
        return False
    c = choices[0]
    return bool(c.get("text")) or c.get("finish_reason") is None


async def stream_one(client: httpx.AsyncClient, r: WorkloadRequest, model: str, rec: RequestRecord,
                     now) -> None:
    """Send one request and fill `rec` from the stream as it arrives (times from `now()`)."""
    chunks = 0
    usage = None
    async with client.stream("POST", "/v1/completions", json=completion_body(r, model)) as resp:
        if resp.status_code != 200:
            body = (await resp.aread()).decode(errors="replace")
            rec.error = f"HTTP {resp.status_code}: {body[:300]}"
            return
        rec.scheduled = now()  # response headers: the server has accepted it
        async for line in resp.aiter_lines():
            payload = parse_sse_line(line)
            if payload is None:
                continue
            if payload == "[DONE]":
                break
            if "error" in payload:
                rec.error = f"stream error: {json.dumps(payload['error'])[:300]}"
                return
            t = now()
            if payload.get("usage"):
                usage = payload["usage"]
            if is_token_chunk(payload):
                chunks += 1
                rec.token_times.append(t)
                if rec.first_token is None:
                    rec.first_token = t
    rec.finish = rec.token_times[-1] if rec.token_times else now()
    # Servers may pack several tokens into one chunk; their own count is the truth when they give it.
    rec.output_tokens = int(usage.get("completion_tokens", chunks)) if usage else chunks
    if usage and usage.get("prompt_tokens") is not None:
        rec.prompt_tokens = int(usage["prompt_tokens"])
    cached = ((usage or {}).get("prompt_tokens_details") or {}).get("cached_tokens")
    if cached is not None:  # OpenAI's field; servers that don't cache (or don't say) leave it out
        rec.cached_tokens = int(cached)


PREFIX_COUNTERS = {"vllm:prefix_cache_queries_total": "queries", "vllm:prefix_cache_hits_total": "hits"}


def parse_prefix_counters(text: str) -> dict[str, float]:
    """The prefix-cache counters of a Prometheus /metrics page (`name{labels} value`), summed over label sets."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        name = line.split("{", 1)[0].split(" ", 1)[0]
        key = PREFIX_COUNTERS.get(name)
        if key is None:
            continue
        rest = line[len(name):]
        fields = (rest.rsplit("}", 1)[-1] if rest.startswith("{") else rest).split()
        try:
            out[key] = out.get(key, 0.0) + float(fields[0])
        except (IndexError, ValueError):
            continue
    return out


async def scrape_prefix_counters(client: httpx.AsyncClient) -> dict[str, float]:
    """Best effort: {} from a server without /metrics or without those counters."""
    try:
        resp = await client.get("/metrics", timeout=5.0)
    except (httpx.HTTPError, ValueError):  # a fake server in tests may fail on an unknown path
        return {}
    return parse_prefix_counters(resp.text) if resp.status_code == 200 else {}


async def first_model_id(client: httpx.AsyncClient) -> str:
    resp = await client.get("/v1/models")
    if resp.status_code != 200:
        raise ValueError(f"GET /v1/models answered HTTP {resp.status_code}: {resp.text[:200]} "
                         "(pass --model, and --api-key if the server wants one)")
    data = resp.json().get("data") or []
    if not data:
        raise ValueError("the server's /v1/models lists no model; pass --model")
    return data[0]["id"]


async def run_openai_async(workload: Workload, url: str, model: str | None = None, system: str = "openai-server",
                           max_duration: float = 600.0, request_timeout: float = 300.0, api_key: str | None = None,
                           progress: bool = True, transport: httpx.AsyncBaseTransport | None = None) -> RunResult:
    base = check_local_url(url)
    n = len(workload.requests)
    if n > MAX_REQUESTS:
        raise ValueError(f"at most {MAX_REQUESTS} requests per run, the workload has {n}")
    if max_duration <= 0:
        raise ValueError(f"max_duration must be > 0 seconds, got {max_duration}")
    # No connection pool limit: a pool queue would add client-side waiting to the server's latency.
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    timeout = httpx.Timeout(request_timeout, connect=10.0)
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    async with httpx.AsyncClient(base_url=base, timeout=timeout, limits=limits, transport=transport,
                                 headers=headers) as client:
        model = model or await first_model_id(client)
        records = [RequestRecord(r.request_id, r.arrival_offset, r.max_tokens, r.template) for r in workload.requests]
        bar = tqdm(total=n, desc=system, unit="req", disable=not progress, dynamic_ncols=True)
        gate = asyncio.Semaphore(workload.concurrency) if workload.concurrency else None
        counters0 = await scrape_prefix_counters(client)
        started_unix = time.time()
        t0 = time.monotonic()

        def now() -> float:
            return time.monotonic() - t0

        async def one(r: WorkloadRequest, rec: RequestRecord) -> None:
            try:
                if gate is None:
                    await asyncio.sleep(max(0.0, r.arrival_offset - now()))  # the arrival process, not compute
                    await stream_one(client, r, model, rec, now)
                else:
                    async with gate:
                        rec.arrival = now()
                        await stream_one(client, r, model, rec, now)
            except asyncio.CancelledError:
                rec.error = f"cancelled: the run's {max_duration:g}s limit was reached"
                raise
            except (httpx.HTTPError, json.JSONDecodeError, ValueError) as e:
                rec.error = f"{type(e).__name__}: {e}"
            finally:
                bar.update(1)

        tasks = [asyncio.create_task(one(r, rec)) for r, rec in zip(workload.requests, records, strict=True)]
        _, pending = await asyncio.wait(tasks, timeout=max_duration)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        finished = [rec.finish for rec in records if rec.finish is not None]
        duration = now() if pending or not finished else max(finished)
        bar.close()
        counters1 = await scrape_prefix_counters(client)
    config = {"url": base, "model": model, "max_duration_s": max_duration, "request_timeout_s": request_timeout,
              "stream": True, "ignore_eos": True}
    run = RunResult(system=system, kind="openai", config=config, requests=records, duration=duration,
                    started_unix=started_unix)
    if {"queries", "hits"} <= counters0.keys() & counters1.keys():
        run.prefix_cache = {"queries": int(counters1["queries"] - counters0["queries"]),
                            "hits": int(counters1["hits"] - counters0["hits"]), "source": "server /metrics"}
    chunks = sum(len(r.token_times) for r in records if r.ok)
    tokens = sum(r.output_tokens for r in records if r.ok)
    if chunks and tokens > 1.05 * chunks:
        run.notes.append(f"the server sent {tokens / chunks:.2f} tokens per SSE chunk on average: inter-token "
                         "latency here is the gap between chunks, and token counts come from its usage report")
    return run


def run_openai(workload: Workload, url: str, **kwargs) -> RunResult:
    return asyncio.run(run_openai_async(workload, url, **kwargs))
