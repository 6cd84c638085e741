"""What the live page sees of an engine core: its KV block map, its queues, its recent history and
each request's trace. Every method runs on the engine's own thread, between two steps (the server
reaches it through `EngineClient.live_snapshot` and friends), so it reads a consistent state.

A snapshot is bounded whatever the load: at most `max_cells` cells in the block map (beyond that a
cell stands for several consecutive blocks: the most-used state among them, their tokens summed),
at most `max_rows` requests per queue (with the totals), and the history's fixed window. The block
map travels as base64 of little-endian arrays (state u8, ref count u8, fill u16, owner i32), which a
page turns into typed arrays without parsing thousands of JSON numbers.
"""

from __future__ import annotations

import base64
import time
from typing import Any

import numpy as np

from pagedserve.core.request import Request, RequestStatus
from pagedserve.engine.request_trace import RequestTracer
from pagedserve.engine.step_history import SERIES, StepHistory

MAX_CELLS = 16384
MAX_ROWS = 100
FREE, CACHED, USED, SHARED = 0, 1, 2, 3  # a block's state in the map (SHARED: more than one owner)


def _b64(array: np.ndarray, dtype: str) -> str:
    return base64.b64encode(np.ascontiguousarray(array, dtype=dtype).tobytes()).decode()


class LiveView:
    def __init__(self, core: Any, tracer: RequestTracer) -> None:
        self.core = core
        self.tracer = tracer
        self.history = StepHistory(core)
        self.started = time.time()

    def block_arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, list[str]]:
        """Per physical block: state, reference count, tokens held, first owner's index; and the owners."""
        kv = self.core.kv
        pool, bs = kv.pool, kv.block_size
        n = pool.num_blocks
        ref = np.asarray(pool.ref_counts, dtype=np.int32)
        hashed = np.fromiter((h is not None for h in pool.block_hashes), dtype=bool, count=n)
        owner = np.full(n, -1, dtype=np.int32)
        fill = np.zeros(n, dtype=np.int32)
        owners: list[str] = []
        for rid, table in kv.block_tables.items():
            if not table:
                continue
            idx = np.asarray(table, dtype=np.int64)
            owner[idx] = np.where(owner[idx] < 0, len(owners), owner[idx])  # the first holder names it
            used = kv.used_slots(rid)
            fill[idx] = np.maximum(fill[idx], np.clip(used - np.arange(len(table)) * bs, 0, bs))
            owners.append(rid)
        fill[(ref == 0) & hashed] = bs  # a cached block is a full one
        state = np.where(ref > 1, SHARED, np.where(ref == 1, USED, np.where(hashed, CACHED, FREE))).astype(np.uint8)
        return state, ref, fill, owner, owners

    def snapshot(self, max_cells: int = MAX_CELLS, max_rows: int = MAX_ROWS) -> dict[str, Any]:
        core = self.core
        kv = core.kv
        bs = kv.block_size
        state, ref, fill, owner, owners = self.block_arrays()
        n = len(state)
        used_blocks = int((ref > 0).sum())
        used_slots = int(fill[ref > 0].sum())
        kv_figures = {"total_blocks": n, "block_size": bs, "used": used_blocks, "free": n - used_blocks,
                      "cached": int((state == CACHED).sum()), "shared": int((state == SHARED).sum()),
                      "utilization": used_blocks / n if n else 0.0,
                      "fragmentation": 1 - used_slots / (used_blocks * bs) if used_blocks else 0.0,
                      "prefix_cache_hit_rate": kv.prefix_stats.hits / kv.prefix_stats.queries
                      if kv.prefix_stats.queries else 0.0}
        per_cell = max(1, -(-n // max_cells))
        if per_cell > 1:  # a cell per `per_cell` consecutive blocks
            pad = -n % per_cell
            state, ref, fill, owner = (np.concatenate([a, np.full(pad, -1 if a is owner else 0, a.dtype)])
                                       .reshape(-1, per_cell) for a in (state, ref, fill, owner))
            pick = state.argmax(axis=1)  # the block with the most-used state speaks for the cell
            rows = np.arange(len(state))
            state, ref, owner, fill = state[rows, pick], ref.max(axis=1), owner[rows, pick], fill.sum(axis=1)
        cells = {"count": len(state), "blocks_per_cell": per_cell,
                 "state": _b64(state, "<u1"), "ref": _b64(np.minimum(ref, 255), "<u1"),
                 "fill": _b64(np.minimum(fill, 65535), "<u2"), "owner": _b64(owner, "<i4")}
        return {"time": time.time(), "uptime_s": round(time.time() - self.started, 1), "kv": kv_figures,
                "cells": cells, "owners": owners, "requests": self._requests(max_rows),
                "series_columns": SERIES, "series": self.history.series(),
                "spec_decode": core.runner.speculator is not None}

    def _requests(self, max_rows: int) -> dict[str, Any]:
        core = self.core
        sched = core.scheduler
        now = time.monotonic()
        running = list(sched.running)
        waiting = [r for r in sched.waiting if r.status != RequestStatus.PREEMPTED]
        preempted = [r for r in sched.waiting if r.status == RequestStatus.PREEMPTED]
        return {"running": [self._row(r, now) for r in running[:max_rows]],
                "waiting": [self._row(r, now) for r in waiting[:max_rows]],
                "preempted": [self._row(r, now) for r in preempted[:max_rows]],
                "finished": self.tracer.recent_rows(max_rows // 4),
                "totals": {"running": len(running), "waiting": len(waiting), "preempted": len(preempted),
                           "compiling_grammar": len(core.pending_grammars)},
                "max_num_seqs": core.config.scheduler.max_num_seqs}

    def _row(self, req: Request, now: float) -> dict[str, Any]:
        first = self.tracer.first_token_time(req.request_id)
        return {"id": req.request_id, "state": req.status.value, "prompt_tokens": req.num_prompt_tokens,
                "generated": len(req.output_token_ids), "blocks": len(self.core.kv.block_tables.get(req.request_id, ())),
                "ttft_ms": None if first is None else round((first - req.arrival_time) * 1e3, 1),
                "age_s": round(now - req.arrival_time, 2), "preemptions": req.num_preemptions,
                "cached_tokens": req.num_cached_tokens or 0}

    def block(self, block_id: int) -> dict[str, Any] | None:
        """One block in full, for the map's hover: every owner, its hash's first bytes."""
        kv = self.core.kv
        pool = kv.pool
        if not 0 <= block_id < pool.num_blocks:
            return None
        holders = [rid for rid, table in kv.block_tables.items() if block_id in table]
        state, ref, fill, _, _ = self.block_arrays()
        digest = pool.block_hashes[block_id]
        return {"block_id": block_id, "state": ["free", "cached", "used", "shared"][int(state[block_id])],
                "ref_count": int(ref[block_id]), "owners": holders, "fill": int(fill[block_id]),
                "block_size": kv.block_size, "hash": digest[:8].hex() if digest else None}

    def request_trace(self, request_id: str) -> dict[str, Any] | None:
        waiting = next((r for r in self.core.scheduler.waiting if r.request_id == request_id), None)
        return self.tracer.trace(request_id, waiting)
