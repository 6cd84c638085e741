"""`pagedserve serve`: the OpenAI-compatible server (FastAPI + uvicorn).

Imports of the web stack happen inside the command, so `pagedserve --help` stays quick.
"""

from __future__ import annotations

import argparse
import os
import signal

from pagedserve.entrypoints.cli import add_engine_args, engine_kwargs
from pagedserve.serving.ray_options import add_ray_args

TOOL_CALL_PARSERS = ("hermes",)  # tool_calls.TOOL_CALL_PARSERS; repeated so --help needs no web stack


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("serve", help="OpenAI-compatible HTTP server")
    g = p.add_argument_group("server")
    g.add_argument("--host", default="127.0.0.1", help="bind address (default: loopback only)")
    g.add_argument("--port", type=int, default=8000)
    g.add_argument("--api-key", default=os.environ.get("PAGEDSERVE_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on /v1/*, /tokenize, /detokenize, /dashboard "
                        "(default: $PAGEDSERVE_API_KEY)")
    g.add_argument("--served-model-name", default=None, help="model name clients use (default: --model)")
    g.add_argument("--max-queued-requests", type=int, default=256,
                   help="requests admitted beyond the running batch (max-num-seqs); more get 503")
    g.add_argument("--stream-interval", type=int, default=1,
                   help="streamed responses send an event once this many tokens have gathered (the first "
                        "token and the end never wait); 1 = every token")
    g.add_argument("--max-request-body-bytes", type=int, default=1 << 20, help="larger bodies get 413")
    g.add_argument("--shutdown-timeout", type=float, default=30.0,
                   help="seconds in-flight requests get to finish after SIGTERM before they are aborted")
    g.add_argument("--enable-auto-tool-choice", action="store_true",
                   help='let tool_choice "auto" (the default with tools) parse the model\'s own tool calls; '
                        "needs --tool-call-parser")
    g.add_argument("--tool-call-parser", default=None, choices=list(TOOL_CALL_PARSERS),
                   help="the model's tool-call format for tool_choice auto (hermes: <tool_call>{...}</tool_call>, "
                        "as Hermes and Qwen models write it)")
    g.add_argument("--dashboard-interval", type=float, default=0.5,
                   help="seconds between the live page's updates (/dashboard; each is one snapshot of the engine)")
    g.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    add_engine_args(p)
    add_ray_args(p)
    p.set_defaults(func=cmd_serve)


def server_config(args: argparse.Namespace):
    """The ServerConfig the options describe (checked): the same for one server and for Ray Serve replicas."""
    from pagedserve.entrypoints.openai.serving_base import ServerConfig

    if args.max_queued_requests < 0:
        raise ValueError(f"--max-queued-requests must be >= 0, got {args.max_queued_requests}")
    if args.stream_interval < 1:
        raise ValueError(f"--stream-interval must be >= 1, got {args.stream_interval}")
    if args.max_request_body_bytes < 1:
        raise ValueError(f"--max-request-body-bytes must be >= 1, got {args.max_request_body_bytes}")
    if not 0.05 <= args.dashboard_interval <= 60:
        raise ValueError(f"--dashboard-interval must be in [0.05, 60] seconds, got {args.dashboard_interval}")
    if args.enable_auto_tool_choice and args.tool_call_parser is None:
        raise ValueError("--enable-auto-tool-choice needs --tool-call-parser (one of: "
                         f"{', '.join(TOOL_CALL_PARSERS)})")
    return ServerConfig(served_model_name=args.served_model_name or args.model, api_key=args.api_key or None,
                        max_queued_requests=args.max_queued_requests,
                        max_body_bytes=args.max_request_body_bytes, stream_interval=args.stream_interval,
                        enable_auto_tool_choice=args.enable_auto_tool_choice,
                        tool_call_parser=args.tool_call_parser, dashboard_interval_s=args.dashboard_interval)


def cmd_serve(args: argparse.Namespace) -> int:
    import logging

    from pagedserve.config import EngineConfig

    config = server_config(args)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.ray:
        # The optional extra: ray is imported only here, never by the engine or the plain server.
        try:
            from pagedserve.serving.ray_app import serve_on_ray
        except ImportError as e:
            raise ValueError(f"--ray needs Ray Serve: pip install 'pagedserve[ray]' ({e})") from None
        from pagedserve.serving.ray_options import options_from_args

        return serve_on_ray(args.model, engine_kwargs(args), config, options_from_args(args))
    from pagedserve.entrypoints.openai.api_server import build_app

    engine_config = EngineConfig.from_kwargs(args.model, **engine_kwargs(args))
    # A config, not an engine: the model is built on the thread that will run it (one OpenMP pool).
    app = build_app(engine_config, config)
    return run_server(app, args.host, args.port, args.shutdown_timeout, args.log_level)


def run_server(app, host: str, port: int, shutdown_timeout: float, log_level: str = "info") -> int:
    """Serve until SIGTERM/SIGINT. Then: stop accepting, let in-flight requests finish, abort the ones
    still running after `shutdown_timeout` (they end with finish_reason "abort"), stop the engine loop
    and return 0."""
    import uvicorn

    class Server(uvicorn.Server):
        def handle_exit(self, sig: int, frame: object) -> None:
            app.state.async_engine.drain_threadsafe(shutdown_timeout)
            super().handle_exit(sig, frame)

    # uvicorn's own deadline is a backstop: by then our drain has ended every request.
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, lifespan="on",
                            timeout_graceful_shutdown=shutdown_timeout + 10)
    server = Server(config)
    # uvicorn re-raises the signal it caught once its graceful shutdown is over; with a no-op handler
    # in place that is a plain return, so the process exits 0 instead of dying by the signal.
    previous = {sig: signal.signal(sig, _ignore) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        server.run()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 0 if server.started else 1


def _ignore(signum: int, frame: object) -> None:
    pass
