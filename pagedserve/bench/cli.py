"""`pagedserve bench ...`: registered into the main CLI through `register(subparsers)`.

    pagedserve bench --policy continuous,static --baseline hf --workload chapter --requests 100 --rate 2 --out DIR
    pagedserve bench --policy continuous --workload prefix --prefix-tokens 1000 --requests 32 --rate 1 --prefix-caching on,off
    pagedserve bench --policy continuous --workload chat --conversations 8 --turns 4 --rate 0.5 --prefix-caching on,off
    pagedserve bench --policy continuous --workload copy --concurrency 1 --requests 8 \\
        --speculative-configs '[null, {"method": "ngram", "num_speculative_tokens": 4}]'
    pagedserve bench serve --url http://127.0.0.1:8000 --workload DIR/workload.jsonl --label pagedserve --out DIR
    pagedserve bench workload --workload chapter --requests 100 --rate 2 --out workload.jsonl
    pagedserve bench report --inputs A B C --out DIR        (one report from several runs' results.json)
"""

from __future__ import annotations

import argparse
import datetime as _dt
import os
import shlex
import sys
from pathlib import Path

from pagedserve.bench.metrics import SLO
from pagedserve.bench.workloads import Workload, load_workload, save_jsonl

EXAMPLES = __doc__.split("\n\n", 1)[1]


def _rate(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"rate must be > 0 requests/s (or 'inf'), got {text!r}")
    return value


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text!r}")
    return value


def _names(text: str) -> list[str]:
    return [] if text.strip().lower() in ("", "none") else [t.strip() for t in text.split(",") if t.strip()]


_SWITCH = {"on": True, "true": True, "1": True, "yes": True, "off": False, "false": False, "0": False, "no": False}


def _switches(text: str) -> list[bool]:
    """'on,off' → [True, False]: one engine system per setting."""
    names = _names(text)
    bad = [n for n in names if n.lower() not in _SWITCH]
    if bad or not names:
        raise argparse.ArgumentTypeError(f"expected a comma list of on/off, got {text!r}")
    return [_SWITCH[n.lower()] for n in names]


def _non_negative(text: str) -> float:
    value = float(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text!r}")
    return value


def default_out_dir(prefix: str = "run") -> str:
    return f"bench-results/{prefix}-{_dt.datetime.now().strftime('%Y%m%d-%H%M%S')}"


def add_workload_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("workload")
    g.add_argument("--workload", default="chapter",
                   help="'chapter' (the chapter's 8 request templates), 'prefix' (one long shared system prompt + "
                        "a distinct question each), 'chat' (multi-turn conversations resending their history), "
                        "'copy' (rewrites, summaries and code edits whose answers repeat their prompts), "
                        "a .jsonl workload file, or a ShareGPT .json")
    g.add_argument("--requests", type=_positive_int, default=None,
                   help="number of requests (chapter: default 100; prefix, copy: 32; chat: conversations x turns; "
                        "files: the first N)")
    g.add_argument("--rate", type=_rate, default=None,
                   help="Poisson arrivals at this many requests/s (chat: conversations started per second); "
                        "'inf' = all at once (default: all at once for a generated workload, the file's own "
                        "arrivals for a file)")
    g.add_argument("--concurrency", type=_positive_int, default=None,
                   help="closed loop: keep this many requests in flight instead of timed arrivals")
    g.add_argument("--seed", type=int, default=0, help="seed of the generator and of the arrival process")
    g.add_argument("--max-tokens-scale", type=float, default=1.0,
                   help="multiply every output length (e.g. 0.25 for a quick run; keeps the templates' proportions)")
    g.add_argument("--max-tokens-cap", type=_positive_int, default=None, help="cap every output length")
    g.add_argument("--prefix-tokens", type=_positive_int, default=1000,
                   help="prefix: tokens of the shared system prompt (by the model's tokenizer where there is one)")
    g.add_argument("--conversations", type=_positive_int, default=None,
                   help="chat: number of conversations (default: enough for --requests, else 8)")
    g.add_argument("--turns", type=_positive_int, default=4, help="chat: turns per conversation")
    g.add_argument("--think-time", type=_non_negative, default=5.0,
                   help="chat: mean seconds between a turn's arrival and the next turn's (exponential, seeded)")


def add_slo_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("goodput SLOs (milliseconds)")
    g.add_argument("--slo-ttft", type=float, default=None, help="time to first token ≤ this many ms")
    g.add_argument("--slo-itl", type=float, default=None, help="a request's mean inter-token latency ≤ this many ms")
    g.add_argument("--slo-e2e", type=float, default=None, help="end-to-end latency ≤ this many ms")


def slo_from_args(args: argparse.Namespace) -> SLO:
    def sec(v: float | None) -> float | None:
        return None if v is None else v / 1000

    return SLO(ttft=sec(args.slo_ttft), itl=sec(args.slo_itl), e2e=sec(args.slo_e2e))


def workload_from_args(args: argparse.Namespace, tokenizer=None) -> Workload:
    return load_workload(args.workload, args.requests, args.seed, args.rate, args.concurrency,
                         args.max_tokens_scale, args.max_tokens_cap, tokenizer, prefix_tokens=args.prefix_tokens,
                         conversations=args.conversations, turns=args.turns, think_time=args.think_time)


def _tokenizer_for(args: argparse.Namespace, model: str | None):
    """ShareGPT files need a tokenizer to turn replies into max_tokens, and prefix/chat to size their text in
    tokens (they estimate without one); the chapter's workload and .jsonl files need none."""
    if args.workload == "chapter" or args.workload.endswith(".jsonl") or not model:
        return None
    from pagedserve.model.loader import load_tokenizer, resolve_model_path

    return load_tokenizer(resolve_model_path(model))


def _print_workload(wl: Workload) -> None:
    d = wl.describe()
    print(f"workload {d['name']}: {d['num_requests']} requests, {d['arrival']}, "
          f"max_tokens {d['max_tokens']['min']}–{d['max_tokens']['max']} (total {d['max_tokens']['total']}), "
          f"fingerprint {d['fingerprint']}", file=sys.stderr)


def _command(args: argparse.Namespace) -> str:
    """The full command line that reproduces this run (every option, defaults included), for the report."""
    parts = ["pagedserve", "bench"] + ([args.bench_command] if args.bench_command else [])
    for dest in args.option_dests:
        value = getattr(args, dest, None)
        if value is None or value is False:
            continue
        flag = "--" + dest.replace("_", "-")
        if value is True:
            parts.append(flag)
        elif isinstance(value, list) and value and all(isinstance(v, bool) for v in value):  # --prefix-caching
            parts += [flag, ",".join("on" if v else "off" for v in value)]
        elif isinstance(value, list):
            parts += [flag, *map(str, value)]
        else:
            parts += [flag, shlex.quote(str(value))]  # a JSON option has spaces and quotes
    return " ".join(parts)


def _finish(parser: argparse.ArgumentParser, func) -> None:
    hidden = ("help", "no_progress", "api_key")  # never write a key into the report
    dests = [a.dest for a in parser._actions if a.option_strings and a.dest not in hidden]
    parser.set_defaults(func=func, option_dests=dests)


# --- commands ----------------------------------------------------------------------------------------


def cmd_offline(args: argparse.Namespace) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # no tokenizer thread pool competing with torch
    from pagedserve.bench.offline import KEEP, parse_speculative_list, run_offline
    from pagedserve.bench.report import terminal_summary
    from pagedserve.entrypoints.cli import engine_kwargs

    options = engine_kwargs(args)
    if args.prefix_caching is not None and "enable_prefix_caching" in options:
        raise ValueError("give either --prefix-caching (one system per setting) or --[no-]enable-prefix-caching")
    if args.speculative_configs is not None and options.get("speculative_config") is not None:
        raise ValueError("give either --speculative-configs (one system per config) or --speculative-config")
    speculative = (KEEP,) if args.speculative_configs is None else parse_speculative_list(args.speculative_configs)
    wl = workload_from_args(args, _tokenizer_for(args, args.model))
    _print_workload(wl)
    out = args.out or default_out_dir("offline")
    results = run_offline(wl, args.model, options, _names(args.policy), _names(args.baseline),
                          args.hf_batch_size, out, slo_from_args(args), progress=not args.no_progress,
                          command=_command(args), prefix_caching=args.prefix_caching or (None,),
                          speculative=speculative)
    print(terminal_summary(results, out))
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from pagedserve.bench.report import terminal_summary, write_report
    from pagedserve.bench.runners.openai_client import check_local_url, run_openai

    base = check_local_url(args.url)  # refuse before doing any work
    wl = workload_from_args(args, _tokenizer_for(args, args.tokenizer))
    _print_workload(wl)
    label = args.label or f"server@{base.split('://', 1)[1]}"
    run = run_openai(wl, base, model=args.model, system=label, max_duration=args.max_duration,
                     request_timeout=args.request_timeout, api_key=args.api_key, progress=not args.no_progress)
    out = args.out or default_out_dir(f"serve-{label}".replace("/", "_").replace(":", "_").replace("@", "_"))
    save_jsonl(wl, Path(out) / "workload.jsonl")
    results = write_report(out, wl, [run], slo_from_args(args), command=_command(args))
    print(terminal_summary(results, out))
    return 0 if run.requests and any(r.ok for r in run.requests) else 1


def cmd_workload(args: argparse.Namespace) -> int:
    wl = workload_from_args(args, _tokenizer_for(args, args.tokenizer))
    path = save_jsonl(wl, args.out)
    _print_workload(wl)
    print(path)
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from pagedserve.bench.report import load_results, terminal_summary, write_report

    workload, runs, notes = None, [], []
    for src in args.inputs:
        wl, these = load_results(src)
        if workload is None:
            workload = wl
        elif wl.fingerprint() != workload.fingerprint():
            notes.append(f"{src}: its workload (fingerprint {wl.fingerprint()}) differs from the first "
                         f"({workload.fingerprint()}); its numbers are not directly comparable")
        for run in these:
            taken = {r.system for r in runs}
            if run.system in taken:
                run.system = f"{run.system}#{len(runs)}"
            runs.append(run)
    results = write_report(args.out, workload, runs, slo_from_args(args), target=args.target, command=_command(args),
                           notes=notes)
    print(terminal_summary(results, args.out))
    return 0


# --- parser --------------------------------------------------------------------------------------------


def register(subparsers: argparse._SubParsersAction) -> None:
    from pagedserve.entrypoints.cli import add_engine_args

    p = subparsers.add_parser(
        "bench", help="benchmark: static vs continuous batching (+ HF), or any OpenAI server over HTTP",
        description="Run a workload through this engine under each batching policy (and optionally HF "
                    "transformers) and write a report with plots.", epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter, conflict_handler="resolve")
    add_engine_args(p)
    # Same max_num_seqs as the HF batch size by default, so that every system batches at most 16.
    p.set_defaults(max_num_seqs=16)
    p.add_argument("--policy", default="continuous,static", help="comma-separated batching policies to run")
    p.add_argument("--baseline", default="none", help="'hf' to add Hugging Face transformers generate, or 'none'")
    p.add_argument("--hf-batch-size", type=_positive_int, default=16, help="static batch size of the HF baseline")
    p.add_argument("--prefix-caching", type=_switches, default=None,
                   help="comma-separated prefix-caching settings, e.g. 'on,off': each policy runs once per setting, "
                        "as systems pagedserve-<policy>-prefix-on/-off (default: one run, as the engine option says)")
    p.add_argument("--speculative-configs", default=None,
                   help="a JSON list of speculative_config objects, null for plain decoding: each policy runs once "
                        "per entry, as systems pagedserve-<policy>-spec-off/-spec-<method>-k<k> (default: one run, "
                        "as --speculative-config says)")
    add_workload_args(p)
    add_slo_args(p)
    p.add_argument("--out", default=None, help="results folder (default bench-results/offline-<time>)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    _finish(p, cmd_offline)

    sub = p.add_subparsers(dest="bench_command", metavar="{serve,workload,report}")
    s = sub.add_parser("serve", help="load-test an OpenAI-compatible server on this machine (streaming completions)",
                       description="Async streaming load generator for /v1/completions (ignore_eos, temperature 0): "
                                   "the same harness for pagedserve's server, llama.cpp's llama-server and vLLM.")
    s.add_argument("--url", required=True, help="http://127.0.0.1:PORT (loopback only)")
    s.add_argument("--model", default=None, help="model name to send (default: the first of /v1/models)")
    s.add_argument("--label", default=None, help="system name in the report (e.g. llama-server)")
    s.add_argument("--api-key", default=os.environ.get("OPENAI_API_KEY"),
                   help="sent as 'Authorization: Bearer KEY' (default: $OPENAI_API_KEY)")
    s.add_argument("--tokenizer", default=None, help="model whose tokenizer sizes a ShareGPT workload")
    s.add_argument("--max-duration", type=float, default=600.0, help="stop the run after this many seconds")
    s.add_argument("--request-timeout", type=float, default=300.0, help="per-request read timeout, seconds")
    add_workload_args(s)
    add_slo_args(s)
    s.add_argument("--out", default=None, help="results folder (default bench-results/serve-<label>-<time>)")
    s.add_argument("--no-progress", action="store_true")
    _finish(s, cmd_serve)

    w = sub.add_parser("workload", help="write a workload file (JSONL) that every system can be given")
    add_workload_args(w)
    w.add_argument("--tokenizer", default=None, help="model whose tokenizer sizes a ShareGPT workload")
    w.add_argument("--out", required=True, help="the .jsonl file to write")
    _finish(w, cmd_workload)

    r = sub.add_parser("report", help="one report from several runs' results.json (e.g. one per server)")
    r.add_argument("--inputs", nargs="+", required=True, help="results folders or results.json files")
    r.add_argument("--out", required=True)
    r.add_argument("--target", default=None, help="system the headline compares against the others")
    add_slo_args(r)
    _finish(r, cmd_report)
