"""The `copy` workload: requests whose answers repeat long spans of their own prompts, where
speculative decoding by prompt lookup has the most to win (and the chapter's workload is the control).

Three templates, all on real text read offline:
- `rewrite`: a passage of reference documentation to rewrite keeping its terms;
- `summary`: a passage to summarize quoting its key sentences;
- `code edit`: a real Python function from the standard library with one local name to rename,
  answered by the whole function again.

Output lengths are about the size of the text to repeat (capped), so a system spends its decode
steps where the copy happens. Prompts are seeded; a saved workload file holds them exactly, so a
replay does not depend on the replaying machine's Python sources.
"""

from __future__ import annotations

import ast
import functools
import importlib
import inspect
import random
import textwrap

from pagedserve.bench.text_source import count_tokens, reference_lines, take_tokens
from pagedserve.bench.workloads import Workload, WorkloadRequest, scale_max_tokens

PASSAGE_TOKENS = (120, 320)
OUTPUT_TOKENS = (96, 320)  # the length of what the answer repeats, clipped to this range
# Pure-Python standard library modules whose functions the code edits come from (stable, no C parts).
CODE_MODULES = ("textwrap", "shlex", "fnmatch", "difflib", "string", "html", "calendar", "base64", "glob",
                "posixpath", "json.decoder", "json.encoder", "csv", "statistics", "heapq", "bisect", "colorsys")
CODE_LINES = (8, 60)

REWRITE = ("Rewrite the following passage in plain English, keeping its technical terms.\n\n"
           "Passage:\n{text}\n\nRewritten passage:\n")
SUMMARY = ("Summarize the following documentation, quoting its most important sentences exactly.\n\n"
           "Documentation:\n{text}\n\nSummary:\n")
CODE_EDIT = ("Rename the variable `{old}` to `{new}` in this Python function and return the whole function.\n\n"
             "```python\n{code}```\n\nThe function with the variable renamed:\n```python\n")


@functools.cache
def stdlib_functions() -> tuple[tuple[str, str, tuple[str, ...]], ...]:
    """(qualified name, source, local names that can be renamed) for every top-level function of
    CODE_MODULES whose source is CODE_LINES long and has a local variable."""
    found = []
    for module_name in CODE_MODULES:
        try:
            module = importlib.import_module(module_name)
            source = inspect.getsource(module)
        except (ImportError, OSError, TypeError):
            continue  # a distribution without this module's source: use the others
        for node in ast.parse(source).body:
            if not isinstance(node, ast.FunctionDef) or node.name.startswith("_"):
                continue
            text = ast.get_source_segment(source, node)
            if text is None or not CODE_LINES[0] <= text.count("\n") + 1 <= CODE_LINES[1]:
                continue
            stored = sorted({n.id for n in ast.walk(node) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store)
                             and len(n.id) > 1})
            if stored:
                found.append((f"{module_name}.{node.name}", textwrap.dedent(text) + "\n", tuple(stored)))
    return tuple(found)


def _output_tokens(repeated_tokens: int, scale: float, cap: int | None) -> int:
    lo, hi = OUTPUT_TOKENS
    return scale_max_tokens(max(lo, min(hi, repeated_tokens)), scale, cap)


def copy_workload(num_requests: int | None = None, seed: int = 0, rate: float | None = None,
                  concurrency: int | None = None, max_tokens_scale: float = 1.0, max_tokens_cap: int | None = None,
                  tokenizer=None) -> Workload:
    """`num_requests` (default 32) requests drawn uniformly from the three templates."""
    n = 32 if num_requests is None else num_requests
    if n < 1:
        raise ValueError(f"num_requests must be >= 1, got {n}")
    if max_tokens_scale <= 0:
        raise ValueError(f"max_tokens_scale must be > 0, got {max_tokens_scale}")
    rng = random.Random(seed)
    source, lines = reference_lines()
    functions = stdlib_functions()
    templates = ["rewrite", "summary"] + (["code edit"] if functions else [])
    requests = []
    for i in range(n):
        template = rng.choice(templates)
        if template == "code edit":
            _, code, names = rng.choice(functions)
            old = rng.choice(names)
            prompt = CODE_EDIT.format(old=old, new=f"{old}_renamed", code=code)
            repeated = count_tokens(code, tokenizer)
        else:
            text = take_tokens(lines, rng.randrange(len(lines)), rng.randint(*PASSAGE_TOKENS), tokenizer)
            prompt = (REWRITE if template == "rewrite" else SUMMARY).format(text=text)
            repeated = count_tokens(text, tokenizer)
        max_tokens = _output_tokens(repeated, max_tokens_scale, max_tokens_cap)
        requests.append(WorkloadRequest(f"req-{i:05d}", prompt, max_tokens, template=template))
    meta = {"generator": "copy", "text_source": source, "code_source": "Python standard library",
            "token_counts": "tokenizer" if tokenizer is not None else "estimated (4 characters per token)",
            "max_tokens_scale": max_tokens_scale, "max_tokens_cap": max_tokens_cap}
    return Workload("copy", requests, seed=seed, meta=meta).with_arrivals(rate, concurrency, seed)
