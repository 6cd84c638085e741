"""The dashboard's routes. The page and its data need the API key when one is set (the guard in
middleware.py accepts it as `?api_key=` here too, because a browser's EventSource sends no headers);
the static files hold no data and stay open."""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse

from pagedserve.engine.protocol import EngineClient
from pagedserve.entrypoints.openai.dashboard.feed import DashboardFeed
from pagedserve.entrypoints.openai.errors import APIError

STATIC = Path(__file__).parent / "static"
STATIC_FILES = {"dashboard.js": "text/javascript", "charts.js": "text/javascript", "dashboard.css": "text/css"}


def _not_found(what: str) -> APIError:
    return APIError(404, f"{what} is not known to this engine", "not_found_error", None, "not_found")


def add_dashboard_routes(app: FastAPI, engine: EngineClient, interval_s: float, max_cells: int,
                         max_rows: int) -> DashboardFeed:
    feed = DashboardFeed(engine, interval_s, max_cells, max_rows)

    @app.get("/dashboard", include_in_schema=False)
    async def dashboard() -> FileResponse:
        return FileResponse(STATIC / "index.html", media_type="text/html", headers={"Cache-Control": "no-cache"})

    @app.get("/dashboard/static/{name}", include_in_schema=False)
    async def static(name: str) -> FileResponse:
        if name not in STATIC_FILES:
            raise _not_found(f"static file {name!r}")
        return FileResponse(STATIC / name, media_type=STATIC_FILES[name], headers={"Cache-Control": "no-cache"})

    @app.get("/dashboard/stream")
    async def stream() -> StreamingResponse:
        """Server-sent events: `snapshot` (JSON, see engine/live_view.py) a few times a second."""
        return StreamingResponse(feed.listen(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    @app.get("/dashboard/snapshot")
    async def snapshot() -> JSONResponse:
        """One snapshot, as the stream sends them."""
        snap = await engine.live_snapshot(max_cells, max_rows)
        if snap is None:
            raise _not_found("a live view")
        return JSONResponse(snap)

    @app.get("/dashboard/block/{block_id}")
    async def block(block_id: int) -> JSONResponse:
        info = await engine.live_block(block_id)
        if info is None:
            raise _not_found(f"block {block_id}")
        return JSONResponse(info)

    @app.get("/dashboard/request/{request_id}")
    async def request_trace(request_id: str) -> JSONResponse:
        """The request's span tree (OTLP/JSON, as --trace-file writes it): live, waiting or recently finished."""
        trace = await engine.live_request_trace(request_id)
        if trace is None:
            raise _not_found(f"request {request_id!r}")
        return JSONResponse(trace)

    return feed
