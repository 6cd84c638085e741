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


def test_scheduling_policy_flag():
    import pytest

    from pagedserve.config import EngineConfig
    from pagedserve.entrypoints.cli import engine_kwargs

    args = build_parser().parse_args(["serve", "--scheduling-policy", "priority"])
    assert engine_kwargs(args)["scheduling_policy"] == "priority"
    assert EngineConfig.from_kwargs("m", **engine_kwargs(args)).scheduler.scheduling_policy == "priority"
    assert "scheduling_policy" not in engine_kwargs(build_parser().parse_args(["serve"]))  # fcfs, the default
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--scheduling-policy", "lifo"])
