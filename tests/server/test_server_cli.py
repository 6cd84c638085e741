"""`pagedserve serve` is registered on the CLI with safe defaults."""

from __future__ import annotations

from pagedserve.entrypoints.cli import build_parser


def test_serve_defaults():
    args = build_parser().parse_args(["serve"])
    assert args.func.__name__ == "cmd_serve"
    assert (args.host, args.port) == ("127.0.0.1", 8000)  # loopback unless asked
    assert args.max_queued_requests == 256 and args.max_request_body_bytes == 1 << 20
    assert args.shutdown_timeout > 0 and args.model == "smollm2-135m"


def test_serve_options():
    args = build_parser().parse_args(["serve", "--model", "m", "--port", "9001", "--api-key", "k",
                                      "--max-queued-requests", "3", "--max-num-seqs", "2",
                                      "--served-model-name", "tiny"])
    assert (args.port, args.api_key, args.max_queued_requests, args.max_num_seqs) == (9001, "k", 3, 2)
    assert args.served_model_name == "tiny"
