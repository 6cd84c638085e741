"""Workloads: a list of requests (prompt, max_tokens, sampling, arrival offset) that every system gets
identically. Made by a generator (the chapter's templates; `prefix`: one long shared system prompt;
`chat`: multi-turn conversations; `copy`: answers that repeat their prompts) or read from a ShareGPT
file; saved and loaded as JSONL (one header line, then one request per line).
"""

from __future__ import annotations

import hashlib
import json
import math
import random
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path

from pagedserve.bench import arrivals
from pagedserve.bench.prompts import CHAPTER_TEMPLATES


@dataclass
class WorkloadRequest:
    request_id: str
    prompt: str
    max_tokens: int
    arrival_offset: float = 0.0  # seconds after the run starts (ignored in closed-loop runs)
    template: str | None = None
    # Greedy and ignore_eos by default: every system then generates exactly max_tokens tokens.
    temperature: float = 0.0
    top_p: float = 1.0
    ignore_eos: bool = True
    seed: int | None = None
    # Multi-turn workloads: the conversation this request belongs to and its turn there (0-based);
    # re-timing keeps a conversation's turns in order and their gaps (the think times).
    conversation: str | None = None
    turn: int | None = None

    def to_json(self) -> dict:
        d = {"id": self.request_id, "prompt": self.prompt, "max_tokens": self.max_tokens,
             "sampling": {"temperature": self.temperature, "top_p": self.top_p,
                          "ignore_eos": self.ignore_eos, "seed": self.seed},
             "arrival_offset": self.arrival_offset, "template": self.template}
        if self.conversation is not None:  # only then: single-turn workloads keep their fingerprints
            d.update(conversation=self.conversation, turn=self.turn)
        return d

    @classmethod
    def from_json(cls, d: dict, index: int) -> WorkloadRequest:
        s = d.get("sampling", {})
        if not isinstance(d.get("prompt"), str) or not d["prompt"]:
            raise ValueError(f"workload line {index}: 'prompt' must be a non-empty string")
        if not isinstance(d.get("max_tokens"), int) or d["max_tokens"] < 1:
            raise ValueError(f"workload line {index}: 'max_tokens' must be an integer >= 1")
        return cls(request_id=str(d.get("id", f"req-{index:05d}")), prompt=d["prompt"], max_tokens=d["max_tokens"],
                   arrival_offset=float(d.get("arrival_offset", 0.0)), template=d.get("template"),
                   temperature=float(s.get("temperature", 0.0)), top_p=float(s.get("top_p", 1.0)),
                   ignore_eos=bool(s.get("ignore_eos", True)), seed=s.get("seed"),
                   conversation=None if d.get("conversation") is None else str(d["conversation"]),
                   turn=None if d.get("turn") is None else int(d["turn"]))


@dataclass
class Workload:
    name: str
    requests: list[WorkloadRequest]
    rate: float | None = None  # requests/s of the Poisson process; None or inf: all at once
    concurrency: int | None = None  # closed loop with this many requests in flight
    seed: int | None = None
    meta: dict = field(default_factory=dict)

    @property
    def arrival(self) -> str:
        multi_turn = any(r.conversation is not None for r in self.requests)
        return arrivals.describe(self.rate, self.concurrency, "conversations/s" if multi_turn else "req/s")

    def header(self) -> dict:
        return {"name": self.name, "num_requests": len(self.requests), "arrival": self.arrival,
                "rate": None if self.rate is None or math.isinf(self.rate) else self.rate,
                "concurrency": self.concurrency, "seed": self.seed, **self.meta}

    def fingerprint(self) -> str:
        """Hash of exactly what the systems are sent: two runs with equal fingerprints saw the same work."""
        h = hashlib.sha256()
        for r in self.requests:
            h.update(json.dumps(r.to_json(), sort_keys=True).encode())
        h.update(json.dumps([self.concurrency], sort_keys=True).encode())
        return h.hexdigest()[:16]

    def describe(self) -> dict:
        """Counts and length statistics for the report."""
        outs = [r.max_tokens for r in self.requests]
        words = [len(r.prompt.split()) for r in self.requests]
        convs = {r.conversation for r in self.requests if r.conversation is not None}
        extra = {"conversations": len(convs)} if convs else {}
        return {**self.header(), **extra, "fingerprint": self.fingerprint(),
                "templates": dict(Counter(r.template or "-" for r in self.requests)),
                "max_tokens": {"min": min(outs), "mean": sum(outs) / len(outs), "max": max(outs), "total": sum(outs)},
                "prompt_words": {"min": min(words), "mean": sum(words) / len(words), "max": max(words)},
                "duration_of_arrivals_s": max(r.arrival_offset for r in self.requests)}

    def with_arrivals(self, rate: float | None = None, concurrency: int | None = None,
                      seed: int | None = None) -> Workload:
        """Re-time the requests: Poisson at `rate`, all at once (rate None/inf), or a closed loop.

        A conversation's turns move together: its start is what gets re-timed (so `rate` counts
        conversations per second), and each later turn keeps its gap after the first one.
        """
        if concurrency is not None and concurrency < 1:
            raise ValueError(f"concurrency must be >= 1, got {concurrency}")
        if concurrency and any(r.turn for r in self.requests):
            raise ValueError("a multi-turn workload is timed by its think times; a closed loop would send "
                             "one conversation's turns at the same time (use --rate instead of --concurrency)")
        groups: dict[object, list[int]] = {}  # conversation (or the request alone) → its request indices
        for i, r in enumerate(self.requests):
            groups.setdefault(("conv", r.conversation) if r.conversation is not None else ("req", i), []).append(i)
        if concurrency or rate is None or math.isinf(rate):
            starts = arrivals.all_at_once(len(groups))
        else:
            starts = arrivals.poisson(len(groups), rate, self.seed if seed is None else seed)
        offsets = [0.0] * len(self.requests)
        for start, members in zip(starts, groups.values(), strict=True):
            first = min(self.requests[i].arrival_offset for i in members)
            for i in members:
                offsets[i] = start + self.requests[i].arrival_offset - first
        reqs = [replace(r, arrival_offset=t) for r, t in zip(self.requests, offsets, strict=True)]
        return replace(self, requests=reqs, rate=None if concurrency else rate, concurrency=concurrency)


def scale_max_tokens(n: int, scale: float = 1.0, cap: int | None = None) -> int:
    """Shrink output lengths for short demo runs while keeping the templates' proportions."""
    n = max(1, round(n * scale))
    return min(n, cap) if cap else n


def chapter_workload(num_requests: int, seed: int = 0, rate: float | None = None, concurrency: int | None = None,
                     max_tokens_scale: float = 1.0, max_tokens_cap: int | None = None) -> Workload:
    """The chapter's benchmark: templates drawn uniformly, output lengths uniform in each template's range."""
    if num_requests < 1:
        raise ValueError(f"num_requests must be >= 1, got {num_requests}")
    if max_tokens_scale <= 0:
        raise ValueError(f"max_tokens_scale must be > 0, got {max_tokens_scale}")
    rng = random.Random(seed)
    requests = []
    for i in range(num_requests):
        name, (lo, hi), make_prompt = rng.choice(CHAPTER_TEMPLATES)
        max_tokens = scale_max_tokens(rng.randint(lo, hi), max_tokens_scale, max_tokens_cap)
        requests.append(WorkloadRequest(f"req-{i:05d}", make_prompt(rng), max_tokens, template=name))
    meta = {"generator": "chapter", "max_tokens_scale": max_tokens_scale, "max_tokens_cap": max_tokens_cap}
    return Workload("chapter", requests, seed=seed, meta=meta).with_arrivals(rate, concurrency, seed)


# --- files -----------------------------------------------------------------------------------------


def save_jsonl(workload: Workload, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        f.write(json.dumps({"workload": workload.header()}) + "\n")
        for r in workload.requests:
            f.write(json.dumps(r.to_json()) + "\n")
    return path


def load_jsonl(path: str | Path) -> Workload:
    path = Path(path)
    header: dict = {}
    requests = []
    with open(path) as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            d = json.loads(line)
            if "workload" in d and lineno == 1:
                header = d["workload"]
                continue
            requests.append(WorkloadRequest.from_json(d, lineno))
    if not requests:
        raise ValueError(f"workload file {str(path)!r} has no requests")
    extra = {k: v for k, v in header.items()
             if k not in ("name", "num_requests", "arrival", "rate", "concurrency", "seed")}
    return Workload(header.get("name", path.stem), requests, rate=header.get("rate"),
                    concurrency=header.get("concurrency"), seed=header.get("seed"), meta=extra)


def load_sharegpt(path: str | Path, num_requests: int, seed: int = 0, tokenizer=None,
                  max_prompt_tokens: int = 1024, max_total_tokens: int = 2048) -> Workload:
    """ShareGPT JSON (a list of {"conversations": [{"from": "human", "value": ...}, {"from": "gpt", ...}]}):
    the first human turn is the prompt, the reply's length is max_tokens (as vLLM's benchmark does).
    Without a tokenizer, lengths are estimated at 4/3 tokens per word."""
    with open(path) as f:
        data = json.load(f)

    def length(text: str) -> int:
        return len(tokenizer.encode(text)) if tokenizer is not None else math.ceil(len(text.split()) * 4 / 3)

    pairs = []
    for entry in data:
        turns = entry.get("conversations") or entry.get("conversation") or []
        if len(turns) < 2 or not turns[0].get("value") or not turns[1].get("value"):
            continue
        pairs.append((turns[0]["value"], turns[1]["value"]))
    random.Random(seed).shuffle(pairs)
    requests = []
    for prompt, reply in pairs:
        if len(requests) == num_requests:
            break
        p, o = length(prompt), length(reply)
        if p < 4 or o < 4 or p > max_prompt_tokens or p + o > max_total_tokens:
            continue  # too short to time, or too long for small models
        requests.append(WorkloadRequest(f"req-{len(requests):05d}", prompt, o, template="sharegpt"))
    if not requests:
        raise ValueError(f"no usable conversations in ShareGPT file {str(path)!r}")
    return Workload("sharegpt", requests, seed=seed, meta={"source": str(path)})


GENERATED = ("chapter", "prefix", "chat", "copy")


def load_workload(spec: str, num_requests: int | None = None, seed: int = 0, rate: float | None = None,
                  concurrency: int | None = None, max_tokens_scale: float = 1.0, max_tokens_cap: int | None = None,
                  tokenizer=None, **generator_options) -> Workload:
    """A generated workload (`chapter`, `prefix`, `chat`, `copy`), a .jsonl workload file, or a ShareGPT .json file.

    For files, `rate`/`concurrency` re-time the requests only when given; `num_requests` keeps the first N.
    `generator_options` go to the prefix/chat generators (prefix_tokens; conversations, turns, think_time).
    """
    if spec == "chapter":
        return chapter_workload(num_requests or 100, seed, rate, concurrency, max_tokens_scale, max_tokens_cap)
    if spec == "copy":
        from pagedserve.bench.copy_heavy import copy_workload  # imports this module

        return copy_workload(num_requests, seed, rate, concurrency, max_tokens_scale, max_tokens_cap, tokenizer)
    if spec in ("prefix", "chat"):
        from pagedserve.bench import shared_prefix  # imports this module

        make = shared_prefix.prefix_workload if spec == "prefix" else shared_prefix.chat_workload
        opts = {k: v for k, v in generator_options.items() if k in shared_prefix.OPTIONS[spec] and v is not None}
        return make(num_requests=num_requests, seed=seed, rate=rate, concurrency=concurrency,
                    max_tokens_scale=max_tokens_scale, max_tokens_cap=max_tokens_cap, tokenizer=tokenizer, **opts)
    path = Path(spec)
    if not path.is_file():
        raise FileNotFoundError(f"workload {spec!r}: not one of {GENERATED} and no such file")
    if path.suffix == ".jsonl":
        wl = load_jsonl(path)
    else:
        wl = load_sharegpt(path, num_requests or 1000, seed, tokenizer)
    if num_requests:
        wl = replace(wl, requests=wl.requests[:num_requests])
    if max_tokens_scale != 1.0 or max_tokens_cap:
        wl = replace(wl, requests=[replace(r, max_tokens=scale_max_tokens(r.max_tokens, max_tokens_scale,
                                                                           max_tokens_cap)) for r in wl.requests])
    if rate is not None or concurrency is not None or path.suffix != ".jsonl":
        wl = wl.with_arrivals(rate, concurrency, seed)
    return wl

