"""`pagedserve perplexity`: perplexity of a text under the engine's own model path, and, against a
reference engine, llama.cpp's `--kl-divergence` figures (mean KL with its standard error, the 99th
percentile of per-token KL, top-1 agreement).

The windows are Hugging Face's sliding-window recipe: windows of `context_length` tokens advancing by
`stride`, each scoring only the tokens no earlier window scored. Every window runs through
EngineCore.prompt_log_softmax (the model runner, the paged KV cache, the engine options as given),
which returns full-vocabulary distributions: KL needs them whole. See docs/quality.md.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

# `--file` shortcuts for offline text (pagedserve/bench/text_source.py reads them).
TEXT_SHORTCUTS = ("pydoc-topics", "licenses")


def read_text(file: str) -> tuple[str, str]:
    """(source name, text) of a path or a shortcut name: `pydoc-topics` (CPython's pydoc_data.topics
    prose) or `licenses` (Debian's /usr/share/common-licenses)."""
    if file in TEXT_SHORTCUTS:
        from pagedserve.bench.text_source import licenses_text, pydoc_topics_text

        text = pydoc_topics_text() if file == "pydoc-topics" else licenses_text()
        if not text:
            raise FileNotFoundError(f"--file {file}: this machine has no such text "
                                    f"({'pydoc_data.topics' if file == 'pydoc-topics' else '/usr/share/common-licenses'})")
        return file, text
    path = Path(file).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"--file {file}: no such file (or one of the shortcuts {', '.join(TEXT_SHORTCUTS)})")
    return str(path), path.read_text(errors="replace")


def sliding_windows(num_tokens: int, context_length: int, stride: int) -> list[tuple[int, int, int]]:
    """(begin, end, first scored) per window, Hugging Face's recipe: window [begin, end) scores tokens
    [first scored, end), those after the previous window's end; a window's first token has no context
    and is never scored. With stride < context length, every token but the text's first is scored
    exactly once; with disjoint windows (stride = context length), each window's first is not."""
    if context_length < 2:
        raise ValueError(f"context length must be >= 2, got {context_length}")
    if not 1 <= stride <= context_length:
        raise ValueError(f"stride must be in [1, context length = {context_length}], got {stride}")
    if num_tokens < 2:
        raise ValueError(f"the text has {num_tokens} token(s): at least 2 are needed to score one")
    windows, prev_end = [], 0
    for begin in range(0, num_tokens, stride):
        end = min(begin + context_length, num_tokens)
        windows.append((begin, end, max(prev_end, begin + 1)))
        prev_end = end
        if end == num_tokens:
            break
    return windows


@dataclass
class _Side:
    """One engine's figures, gathered window by window."""

    nll: list[torch.Tensor] = field(default_factory=list)  # per scored token, float64
    seconds: float = 0.0

    def summary(self) -> dict[str, float]:
        nll = torch.cat(self.nll)
        mean = nll.mean().item()
        sem = nll.std().item() / math.sqrt(len(nll)) if len(nll) > 1 else 0.0
        ppl = math.exp(mean)
        return {"perplexity": ppl, "perplexity_stderr": ppl * sem, "mean_nll": mean, "seconds": self.seconds}


def _quantile(values: torch.Tensor, q: float) -> float:
    """Linear-interpolated quantile (torch.quantile refuses inputs over 16M elements)."""
    s = values.sort().values
    pos = q * (len(s) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(s) - 1)
    return (s[lo] + (s[hi] - s[lo]) * (pos - lo)).item()


def evaluate(score: Callable[[list[int], int], torch.Tensor], tokens: list[int], context_length: int,
             stride: int, reference: Callable[[list[int], int], torch.Tensor] | None = None,
             progress: Callable[[int, int], None] | None = None) -> dict[str, object]:
    """Perplexity of `tokens` under `score` (EngineCore.prompt_log_softmax or alike: the log-softmax
    rows that predict tokens first.. of a window), and with `reference`, KL(reference || score) and
    top-1 agreement at every scored position."""
    windows = sliding_windows(len(tokens), context_length, stride)
    test, ref = _Side(), _Side()
    kl: list[torch.Tensor] = []
    same_top1 = 0
    for i, (begin, end, first) in enumerate(windows):
        window = tokens[begin:end]
        targets = torch.tensor(tokens[first:end])
        # Each engine's seconds end with its NLLs on the CPU: that waits for an asynchronous device.
        started = time.perf_counter()
        q = score(window, first - begin)
        targets = targets.to(q.device)
        test.nll.append(-q.gather(1, targets[:, None]).squeeze(1).double().cpu())
        test.seconds += time.perf_counter() - started
        if reference is not None:
            started = time.perf_counter()
            p = reference(window, first - begin)
            if p.shape != q.shape:
                raise ValueError(f"the reference's distributions have shape {tuple(p.shape)}, the model's "
                                 f"{tuple(q.shape)}: they must share the vocabulary")
            ref.nll.append(-p.gather(1, targets.to(p.device)[:, None]).squeeze(1).double().cpu())
            ref.seconds += time.perf_counter() - started
            p = p.to(q.device)
            kl.append((p.exp() * (p - q)).sum(dim=1).double().cpu())  # per position, in nats
            same_top1 += int((p.argmax(dim=1) == q.argmax(dim=1)).sum())
        if progress is not None:
            progress(i + 1, len(windows))
    scored = sum(end - first for _, end, first in windows)
    result: dict[str, object] = {
        "tokens": len(tokens), "scored_tokens": scored, "windows": len(windows),
        "context_length": context_length, "stride": stride,
        "fed_tokens": sum(end - begin - 1 for begin, end, _ in windows),  # per engine
        **test.summary()}
    if reference is not None:
        per_token = torch.cat(kl)
        agree = same_top1 / scored
        ref_summary = ref.summary()
        result["reference"] = ref_summary
        result["perplexity_ratio"] = result["perplexity"] / ref_summary["perplexity"]
        result["kl"] = {
            "mean": per_token.mean().item(),
            "stderr": per_token.std().item() / math.sqrt(scored) if scored > 1 else 0.0,
            "median": _quantile(per_token, 0.5), "p99": _quantile(per_token, 0.99), "max": per_token.max().item()}
        result["top1_agreement"] = {
            "percent": 100 * agree,
            "stderr": 100 * math.sqrt(agree * (1 - agree) / (scored - 1)) if scored > 1 else 0.0}
    return result


def tokenize_text(tokenizer, text: str, max_tokens: int | None = None) -> list[int]:
    """The whole text's token ids, special tokens as the tokenizer adds them (Hugging Face's recipe:
    one sequence, cut into windows afterwards); with `max_tokens`, cut to score that many."""
    tokens = tokenizer(text, verbose=False)["input_ids"]  # verbose: no warning past model_max_length
    return tokens if max_tokens is None else tokens[:max_tokens + 1]  # the first token is context only


def _config(model: str, options: dict[str, object], what: str):
    from pagedserve.config import EngineConfig

    try:
        return EngineConfig.from_kwargs(model, **options)
    except TypeError as exc:  # an unknown option name
        raise ValueError(f"{what}: {exc}") from None


def _reference_options(text: str | None, test_options: dict[str, object]) -> dict[str, object]:
    """The test engine's options with the JSON object's keys replacing theirs."""
    if not text:
        return dict(test_options)
    try:
        extra = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"--reference-options is not JSON: {exc}") from None
    if not isinstance(extra, dict):
        raise ValueError(f"--reference-options must be a JSON object of engine options, got {text!r}")
    return {**test_options, **extra}


def cmd_perplexity(args: argparse.Namespace) -> int:
    from pagedserve.engine.core import EngineCore
    from pagedserve.entrypoints.cli import engine_kwargs
    from pagedserve.model.loader import load_tokenizer

    # Every check that needs no model first: a bad flag fails in a second, not after a load.
    sliding_windows(2, args.context_length, args.stride)
    if args.max_tokens is not None and args.max_tokens < 1:
        raise ValueError(f"--max-tokens must be >= 1, got {args.max_tokens}")
    kl_wanted = args.kl_divergence or args.reference_model is not None or args.reference_options is not None
    options = engine_kwargs(args)
    ref_options = _reference_options(args.reference_options, options) if kl_wanted else None
    source, text = read_text(args.file)
    config = _config(args.model, options, "engine options")  # both validated before either loads
    ref_config = _config(args.reference_model or args.model, ref_options, "--reference-options") if kl_wanted else None

    core = EngineCore(config)
    if args.context_length > core.max_model_len:
        raise ValueError(f"--context-length {args.context_length} exceeds the model's max_model_len "
                         f"({core.max_model_len})")
    tokenizer = load_tokenizer(core.model_path)
    tokens = tokenize_text(tokenizer, text, args.max_tokens)
    reference = None
    if ref_config is not None:
        ref_core = EngineCore(ref_config)
        if ref_core.model_path != core.model_path and (
                load_tokenizer(ref_core.model_path).get_vocab() != tokenizer.get_vocab()):
            raise ValueError("--reference-model must share the model's tokenizer (KL compares distributions "
                             "token by token)")
        if args.context_length > ref_core.max_model_len:
            raise ValueError(f"--context-length {args.context_length} exceeds the reference's max_model_len "
                             f"({ref_core.max_model_len})")
        reference = ref_core.prompt_log_softmax

    def progress(done: int, total: int) -> None:
        if not args.quiet and (done == total or done % max(1, total // 10) == 0):
            print(f"  window {done}/{total}", file=sys.stderr, flush=True)

    print(f"scoring {len(tokens)} tokens of {source} (context {args.context_length}, stride {args.stride})",
          file=sys.stderr)
    started = time.perf_counter()
    result = evaluate(core.prompt_log_softmax, tokens, args.context_length, args.stride, reference, progress)
    elapsed = time.perf_counter() - started
    result.update(model=args.model, file=source, engine_options=_jsonable(options), elapsed_s=elapsed,
                  tokens_per_s=result["scored_tokens"] / elapsed)
    if kl_wanted:
        result["reference"].update(model=args.reference_model or args.model, engine_options=_jsonable(ref_options))
    print(format_result(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0


def _jsonable(options: dict[str, object]) -> dict[str, object]:
    return {k: v if isinstance(v, (str, int, float, bool, type(None), dict, list)) else str(v)
            for k, v in options.items()}


def format_result(r: dict) -> str:
    lines = [f"perplexity: {r['perplexity']:.4f} ± {r['perplexity_stderr']:.4f}",
             f"scored tokens: {r['scored_tokens']} ({r['windows']} windows of <= {r['context_length']} tokens, "
             f"stride {r['stride']})",
             f"elapsed: {r['elapsed_s']:.2f} s ({r['tokens_per_s']:.1f} scored tokens/s; the model's own "
             f"windows: {r['seconds']:.2f} s)"]
    if "kl" in r:
        ref, kl, top1 = r["reference"], r["kl"], r["top1_agreement"]
        lines += [f"reference perplexity: {ref['perplexity']:.4f} ± {ref['perplexity_stderr']:.4f} "
                  f"(its windows: {ref['seconds']:.2f} s)",
                  f"perplexity ratio (model / reference): {r['perplexity_ratio']:.6f}",
                  # %g: rounding-level KL (1e-9) stays visible instead of printing as 0.000000
                  f"mean KL(reference || model): {kl['mean']:.6g} ± {kl['stderr']:.3g} nats",
                  f"KL median: {kl['median']:.6g}, 99th percentile: {kl['p99']:.6g}, max: {kl['max']:.6g}",
                  f"top-1 agreement: {top1['percent']:.3f} ± {top1['stderr']:.3f} %"]
    return "\n".join(lines)


def register(subparsers: argparse._SubParsersAction) -> None:
    from pagedserve.entrypoints.cli import add_engine_args

    p = subparsers.add_parser("perplexity", help="perplexity of a text; KL divergence against a reference")
    g = p.add_argument_group("perplexity")
    g.add_argument("--file", required=True,
                   help=f"text file, or a shortcut for offline text: {', '.join(TEXT_SHORTCUTS)}")
    g.add_argument("--context-length", type=int, default=512, help="tokens per window (default: 512)")
    g.add_argument("--stride", type=int, default=256,
                   help="tokens a window advances by; each scores the tokens past the previous one's end "
                        "(default: 256)")
    g.add_argument("--max-tokens", type=int, default=None, help="score at most this many tokens of the text")
    g.add_argument("--json", default=None, metavar="OUT", help="also write the figures as JSON here")
    g.add_argument("--quiet", action="store_true", help="no progress lines")
    k = p.add_argument_group("KL divergence (against a reference engine, as llama.cpp's --kl-divergence)")
    k.add_argument("--kl-divergence", action="store_true",
                   help="compare with a reference engine (implied by either --reference-* flag)")
    k.add_argument("--reference-model", default=None, help="reference model (default: --model)")
    k.add_argument("--reference-options", default=None, metavar="JSON",
                   help="the reference engine's options as a JSON object of engine keyword options, replacing "
                        "the engine flags' values, e.g. '{\"dtype\": \"float32\", \"cpu_kernels\": false}'")
    add_engine_args(p)
    p.set_defaults(func=cmd_perplexity)
