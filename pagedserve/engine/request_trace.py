"""Request traces: one OpenTelemetry-shaped span tree per request, built from the core's steps.

A step observer of the engine core (`EngineCore.observers`). Per request it records:

    request                      root span: arrival -> finish; prompt/output/cached tokens, finish reason
      queued                     arrival (or a preemption) -> scheduled; one per wait
      prefill                    one per chunk: the step that computed it, its first position and tokens
      decode                     one per run of decode steps (a preemption ends a run): steps, tokens
    events: cache_hit (tokens), preempted, first_token

Times are the core's monotonic clock turned into Unix nanoseconds. A finished request's tree is one
line of OTLP/JSON (`{"resourceSpans": [...]}`, what an OpenTelemetry collector's file receiver reads)
in the trace file, when there is one; the last finished ones and every live one are kept for the live
page (`trace(request_id)`), which draws its request timelines from the same records. No network, no
collector: the file is the export.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from typing import IO, Any

from pagedserve.core.request import Request
from pagedserve.core.sched.output import SchedulerOutput
from pagedserve.engine.core_messages import EngineCoreOutputs

SCOPE = {"name": "pagedserve", "version": "0.1.0"}
MAX_TOKEN_POINTS = 256  # a decode run's tokens-over-time curve is thinned to at most this many points
RECENT_TRACES = 256  # finished requests kept for the live page


def _attr(key: str, value: Any) -> dict[str, Any]:
    """One OTLP attribute."""
    if isinstance(value, bool):
        return {"key": key, "value": {"boolValue": value}}
    if isinstance(value, int):
        return {"key": key, "value": {"intValue": str(value)}}
    if isinstance(value, float):
        return {"key": key, "value": {"doubleValue": value}}
    if isinstance(value, list):
        return {"key": key, "value": {"arrayValue": {"values": [_attr("", v)["value"] for v in value]}}}
    return {"key": key, "value": {"stringValue": str(value)}}


@dataclass
class _Span:
    name: str
    start: float
    end: float | None = None
    attributes: dict[str, Any] = field(default_factory=dict)
    events: list[tuple[str, float, dict[str, Any]]] = field(default_factory=list)
    span_id: str = field(default_factory=lambda: os.urandom(8).hex())


@dataclass
class _Live:
    """What the tracer knows of one request still in the core."""

    request: Request
    trace_id: str
    root: _Span
    children: list[_Span] = field(default_factory=list)
    queued_since: float | None = None
    chunks: list[tuple[_Span, int]] = field(default_factory=list)  # this step's prefill chunks
    decode: _Span | None = None  # the current run of decode steps
    tokens: int = 0
    points: list[tuple[float, int]] = field(default_factory=list)  # (time, output tokens so far)


class RequestTracer:
    """Builds the span trees; writes finished ones to `path` (JSON lines) when given."""

    def __init__(self, path: str | None = None) -> None:
        self.path = path
        self._file: IO[str] | None = open(path, "a", buffering=1) if path else None  # line-buffered  # noqa: SIM115
        self._live: dict[str, _Live] = {}
        self._recent: OrderedDict[str, dict[str, Any]] = OrderedDict()
        self._rows: deque[dict[str, Any]] = deque(maxlen=RECENT_TRACES)  # their summaries, oldest first
        self._lock = threading.Lock()  # the page reads `_recent` from the event loop's thread
        self._unix_offset = time.time() - time.monotonic()

    # --- the core's step observer ------------------------------------------------------------------

    def on_schedule(self, sched: SchedulerOutput, now: float) -> None:
        for req in sched.preempted:
            live = self._live.get(req.request_id)
            if live is not None:
                live.root.events.append(("preempted", now, {"computed_tokens": live.tokens}))
                self._end_decode(live, now)
                live.queued_since = now
        for s in sched.scheduled:
            req = s.request
            live = self._live.get(req.request_id) or self._start(req)
            if live.queued_since is not None:
                live.children.append(_Span("queued", live.queued_since, now))
                live.queued_since = None
            # a prompt chunk (or a recomputation after preemption) until every known token but the last
            # is in the cache and the request has output; after that each step is a decode step
            if req.num_computed_tokens < req.num_tokens - 1 or not req.output_token_ids:
                chunk = _Span("prefill", now, attributes={"position": req.num_computed_tokens,
                                                          "tokens": s.num_new_tokens,
                                                          "recompute": req.num_preemptions > 0})
                live.chunks.append((chunk, s.num_new_tokens))
            else:
                if live.decode is None:
                    live.decode = _Span("decode", now, attributes={"steps": 0, "tokens": 0})
                live.decode.attributes["steps"] += 1
                if s.num_spec_tokens:
                    live.decode.attributes["speculated"] = live.decode.attributes.get("speculated", 0) + s.num_spec_tokens

    def on_step(self, sched: SchedulerOutput, outputs: EngineCoreOutputs, start: float, end: float) -> None:
        for s in sched.scheduled:
            live = self._live.get(s.request.request_id)
            if live is None:
                continue
            for chunk, _ in live.chunks:
                chunk.end = end
                live.children.append(chunk)
            live.chunks.clear()
            if live.decode is not None:
                live.decode.end = end
        for out in outputs.outputs:
            live = self._live.get(out.request_id)
            if live is None:
                continue
            if out.new_token_ids:
                if live.tokens == 0:
                    live.root.events.append(("first_token", end, {}))
                live.tokens += len(out.new_token_ids)
                live.points.append((end, live.tokens))
                if live.decode is not None:
                    live.decode.attributes["tokens"] += len(out.new_token_ids)
            if out.finished:
                self._finish(live, end, out.finish_reason or "stop")

    def on_abort(self, request_ids: list[str], now: float) -> None:
        for rid in request_ids:
            live = self._live.get(rid)
            if live is not None:
                self._finish(live, now, "abort")

    # --- records ---------------------------------------------------------------------------------

    def trace(self, request_id: str, waiting: Request | None = None) -> dict[str, Any] | None:
        """The request's tree in OTLP/JSON: finished, live (open spans end now), or — for a request
        still waiting for its first step, passed as `waiting` — its queued span so far."""
        with self._lock:
            done = self._recent.get(request_id)
        if done is not None:
            return done
        live = self._live.get(request_id)
        if live is None and waiting is not None:
            live = _Live(waiting, os.urandom(16).hex(), _Span("request", waiting.arrival_time),
                         queued_since=waiting.arrival_time)
        return None if live is None else self._export(live, time.monotonic(), finished=False)

    def recent_rows(self, limit: int) -> list[dict[str, Any]]:
        """The last finished requests, newest first, as the page's table rows."""
        with self._lock:
            return list(self._rows)[-limit:][::-1] if limit > 0 else []

    def first_token_time(self, request_id: str) -> float | None:
        live = self._live.get(request_id)
        return live.points[0][0] if live is not None and live.points else None

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def _start(self, req: Request) -> _Live:
        root = _Span("request", req.arrival_time)
        live = _Live(req, os.urandom(16).hex(), root, queued_since=req.arrival_time)
        if req.num_computed_tokens:  # admitted with prefix-cache hits: those tokens are never computed
            root.events.append(("cache_hit", req.first_scheduled_time or req.arrival_time,
                                {"tokens": req.num_computed_tokens}))
        self._live[req.request_id] = live
        return live

    def _end_decode(self, live: _Live, now: float) -> None:
        if live.decode is not None:
            live.decode.end = live.decode.end or now
            live.children.append(live.decode)
            live.decode = None

    def _finish(self, live: _Live, end: float, reason: str) -> None:
        del self._live[live.request.request_id]
        self._end_decode(live, end)
        if live.queued_since is not None:  # aborted while waiting
            live.children.append(_Span("queued", live.queued_since, end))
            live.queued_since = None
        live.root.attributes["finish_reason"] = reason
        record = self._export(live, end, finished=True)
        req = live.request
        first = live.points[0][0] if live.points else None
        row = {"id": req.request_id, "state": reason, "prompt_tokens": req.num_prompt_tokens,
               "generated": live.tokens, "ttft_ms": None if first is None else round((first - req.arrival_time) * 1e3, 1),
               "e2e_s": round(end - req.arrival_time, 3), "preemptions": req.num_preemptions,
               "cached_tokens": req.num_cached_tokens or 0}
        with self._lock:
            self._rows.append(row)
            self._recent[live.request.request_id] = record
            while len(self._recent) > RECENT_TRACES:
                self._recent.popitem(last=False)
        if self._file is not None:
            self._file.write(json.dumps(record, separators=(",", ":")) + "\n")

    def _ns(self, t: float) -> str:
        return str(int((t + self._unix_offset) * 1e9))

    def _export(self, live: _Live, now: float, finished: bool) -> dict[str, Any]:
        req = live.request
        root = live.root
        root.end = now if finished else None
        root.attributes.update({"request_id": req.request_id, "prompt_tokens": req.num_prompt_tokens,
                                "output_tokens": live.tokens, "cached_tokens": req.num_cached_tokens or 0,
                                "num_preemptions": req.num_preemptions, "finished": finished})
        points = live.points
        if len(points) > MAX_TOKEN_POINTS:  # thin evenly, keep the last point
            step = len(points) / MAX_TOKEN_POINTS
            points = [points[int(i * step)] for i in range(MAX_TOKEN_POINTS - 1)] + [points[-1]]
        root.attributes["token_times_ms"] = [round((t - req.arrival_time) * 1e3, 3) for t, _ in points]
        root.attributes["token_counts"] = [n for _, n in points]
        children = list(live.children)
        if live.queued_since is not None:
            children.append(_Span("queued", live.queued_since, None))
        if live.decode is not None:
            children.append(live.decode)
        spans = [self._otlp(root, live.trace_id, None, now)]
        spans += [self._otlp(c, live.trace_id, root.span_id, now) for c in children]
        resource = {"attributes": [_attr("service.name", "pagedserve")]}
        return {"resourceSpans": [{"resource": resource, "scopeSpans": [{"scope": SCOPE, "spans": spans}]}]}

    def _otlp(self, span: _Span, trace_id: str, parent: str | None, now: float) -> dict[str, Any]:
        out: dict[str, Any] = {
            "traceId": trace_id, "spanId": span.span_id, "name": span.name, "kind": 1,
            "startTimeUnixNano": self._ns(span.start), "endTimeUnixNano": self._ns(span.end if span.end else now),
            "attributes": [_attr(k, v) for k, v in span.attributes.items()],
            "events": [{"name": n, "timeUnixNano": self._ns(t), "attributes": [_attr(k, v) for k, v in a.items()]}
                       for n, t, a in span.events],
            "status": {"code": 2 if span.attributes.get("finish_reason") == "abort" else 1}}
        if parent is not None:
            out["parentSpanId"] = parent
        if span.end is None:
            out["attributes"].append(_attr("open", True))
        return out
