"""`pagedserve` command line: generate | chat (serve, router, perplexity and bench register themselves here too)."""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import sys
import time

from pagedserve.config import CacheConfig, EngineConfig, SchedulerConfig

_TYPES = {"int": int, "float": float, "str": str}


def engine_option_fields() -> list[dataclasses.Field]:
    """Every engine option a user sets: EngineConfig's own fields and its cache and scheduler configs'."""
    own = [f for f in dataclasses.fields(EngineConfig) if f.name not in ("model", "cache", "scheduler")]
    every = own + list(dataclasses.fields(CacheConfig)) + list(dataclasses.fields(SchedulerConfig))
    return [f for f in every if f.metadata.get("cli", True)]


def add_engine_args(p: argparse.ArgumentParser) -> None:
    """One flag per config field, generated from the dataclasses (their type, default and help). Unset
    flags stay out of the namespace, so the config's own default (an env var's, say) applies."""
    g = p.add_argument_group("engine")
    g.add_argument("--model", default="smollm2-135m", help="known name, GGUF file or HF folder")
    for f in engine_option_fields():
        flag = "--" + f.name.replace("_", "-")
        meta = f.metadata
        assert "help" in meta, f"config field {f.name} has no help text"
        default = f.default if f.default is not dataclasses.MISSING else None
        shown = "" if default is None else f" (default: {default})"
        kind = str(f.type).replace(" | None", "")
        if "parse" in meta:  # a structured option given as text (JSON)
            g.add_argument(flag, type=_argument_type(meta["parse"]), default=argparse.SUPPRESS, help=meta["help"])
        elif kind == "bool":
            g.add_argument(flag, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS,
                           help=f"{meta.get('help', '')}{shown}")
        else:
            g.add_argument(flag, type=_TYPES[kind], default=argparse.SUPPRESS, choices=meta.get("choices"),
                           help=f"{meta.get('help', '')}{shown}")


def _argument_type(parse):
    """argparse shows an ArgumentTypeError's own message (a plain ValueError becomes 'invalid value')."""
    def convert(text: str):
        try:
            return parse(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
    convert.__name__ = parse.__name__
    return convert


def engine_kwargs(args: argparse.Namespace) -> dict[str, object]:
    """The engine options the command line set (for EngineConfig.from_kwargs / LLM)."""
    return {f.name: getattr(args, f.name) for f in engine_option_fields() if hasattr(args, f.name)}


def add_sampling_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("sampling")
    g.add_argument("--max-tokens", type=int, default=128)
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=-1)
    g.add_argument("--min-p", type=float, default=0.0)
    g.add_argument("--repetition-penalty", type=float, default=1.0)
    g.add_argument("--presence-penalty", type=float, default=0.0)
    g.add_argument("--frequency-penalty", type=float, default=0.0)
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    g.add_argument("--ignore-eos", action="store_true")


def sampling_params(args: argparse.Namespace):
    from pagedserve.sampling_params import SamplingParams

    return SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                          top_k=args.top_k, min_p=args.min_p, repetition_penalty=args.repetition_penalty,
                          presence_penalty=args.presence_penalty, frequency_penalty=args.frequency_penalty,
                          seed=args.seed, stop=args.stop, ignore_eos=args.ignore_eos)


def cmd_generate(args: argparse.Namespace) -> int:
    from pagedserve.entrypoints.llm import LLM

    params = sampling_params(args)
    llm = LLM(args.model, **engine_kwargs(args))
    start = time.monotonic()
    outputs = llm.generate(args.prompt, params, use_tqdm=False)
    elapsed = time.monotonic() - start
    total = 0
    for out in outputs:
        for c in out.outputs:
            total += len(c.token_ids)
            print(f"--- prompt: {out.prompt!r}\n{c.text}\n[finish_reason={c.finish_reason}, tokens={len(c.token_ids)}]")
    print(f"{total} tokens in {elapsed:.2f}s ({total / elapsed:.1f} tok/s)", file=sys.stderr)
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    """Interactive chat: the model's chat template, tokens streamed as they come."""
    from pagedserve.entrypoints.llm import LLM

    params = sampling_params(args)
    llm = LLM(args.model, **engine_kwargs(args))
    engine = llm.engine
    history: list[dict[str, str]] = []
    if args.system:
        history.append({"role": "system", "content": args.system})
    print("Type a message (empty line or Ctrl-D to quit).", file=sys.stderr)
    while True:
        try:
            line = input("you> ")
        except EOFError:
            break
        if not line.strip():
            break
        history.append({"role": "user", "content": line})
        request_id = engine.add_request(None, {"prompt_token_ids": llm.apply_chat_template(history)}, params)
        print("assistant> ", end="", flush=True)
        reply = ""
        done = False
        while not done:
            for out in engine.step():
                if out.request_id != request_id:
                    continue
                delta = out.outputs[0].text_delta
                reply += delta
                print(delta, end="", flush=True)
                done = out.finished
        print()
        history.append({"role": "assistant", "content": reply})
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pagedserve", description="paged-KV LLM inference engine")
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="generate text for one or more prompts")
    gen.add_argument("--prompt", action="append", required=True, help="prompt text (repeatable: one batch)")
    add_engine_args(gen)
    add_sampling_args(gen)
    gen.set_defaults(func=cmd_generate)

    chat = sub.add_parser("chat", help="interactive chat with the model's chat template")
    chat.add_argument("--system", default=None, help="system message")
    add_engine_args(chat)
    add_sampling_args(chat)
    chat.set_defaults(func=cmd_chat)

    for register in _optional_commands():
        register(sub)
    return parser


def _optional_commands():
    """Subcommands living in their own modules add themselves through `register`: serve, router, perplexity,
    and bench when its extra (`pip install pagedserve[bench]`: plots) is installed."""
    from pagedserve.entrypoints.openai.cli import register as register_serve
    from pagedserve.entrypoints.perplexity import register as register_perplexity
    from pagedserve.serving.cli import register as register_router

    registers = [register_serve, register_perplexity, register_router]
    if importlib.util.find_spec("matplotlib") is not None:
        from pagedserve.bench.cli import register as register_bench

        registers.append(register_bench)
    else:
        registers.append(_register_bench_hint)
    return registers


def _register_bench_hint(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="benchmarks (needs: pip install 'pagedserve[bench]')", add_help=False)
    p.add_argument("rest", nargs=argparse.REMAINDER)
    p.set_defaults(func=lambda args: _missing_extra("bench"))


def _missing_extra(name: str) -> int:
    print(f"error: `pagedserve {name}` needs the {name} extra: pip install 'pagedserve[{name}]'", file=sys.stderr)
    return 2


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
