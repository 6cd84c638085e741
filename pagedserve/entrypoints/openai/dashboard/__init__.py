"""The live page: GET /dashboard (static HTML/JS/CSS shipped in static/, no build step, no CDN), fed by
a server-sent-events stream of engine snapshots (/dashboard/stream), with on-demand details of one
block (/dashboard/block/ID) and one request's trace (/dashboard/request/ID)."""

from pagedserve.entrypoints.openai.dashboard.routes import add_dashboard_routes

__all__ = ["add_dashboard_routes"]
