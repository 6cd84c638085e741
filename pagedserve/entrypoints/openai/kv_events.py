"""GET /kv_events: the prefix cache's block stored/removed events, for a KV-aware router.

`?since=SEQ` returns the events after that sequence number (at most `limit`, `more` says whether
others follow); a reader that is new (`since=-1`), from another epoch (the engine restarted) or too far
behind (its next event was dropped) gets `snapshot`, every block hash held now, and continues from
`last_seq`. Hashes are hex strings of `core/prefix_cache.py`'s chained block hashes over `block_size`
tokens, so a router computes the same ones from a prompt's token ids.
"""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from pagedserve.entrypoints.openai.errors import APIError, bad_request

MAX_LIMIT = 16384

router = APIRouter()


@router.get("/kv_events")
async def kv_events(request: Request, since: str = "-1", epoch: str | None = None, limit: str = "4096") -> JSONResponse:
    try:
        since_n = int(since)
    except ValueError:
        raise bad_request(f"since must be an integer, got {since!r}", "since") from None
    try:
        limit_n = int(limit)
    except ValueError:
        raise bad_request(f"limit must be an integer, got {limit!r}", "limit") from None
    if not 1 <= limit_n <= MAX_LIMIT:
        raise bad_request(f"limit must be in [1, {MAX_LIMIT}], got {limit_n}", "limit")
    engine = request.app.state.async_engine
    log = engine.kv_events()
    if log is None:
        raise APIError(404, "this engine publishes no KV events (prefix caching is off)", "not_found_error",
                       None, "kv_events_unavailable")
    batch = log.read(since_n, epoch, limit_n)
    return JSONResponse({
        "epoch": batch.epoch, "block_size": engine.kv_block_size(), "last_seq": batch.last_seq, "more": batch.more,
        "events": [{"seq": e.seq, "type": e.type, "block_hash": e.block_hash.hex() if e.block_hash else None}
                   for e in batch.events],
        "snapshot": None if batch.snapshot is None else [h.hex() for h in batch.snapshot],
    })
