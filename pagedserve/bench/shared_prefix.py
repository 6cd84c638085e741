"""Workloads whose prompts share long prefixes, for measuring prefix caching:

- `prefix`: every request starts with one long system prompt (a header and about `prefix_tokens`
  tokens of reference text) and ends with its own short question;
- `chat`: multi-turn conversations where turn t's prompt is the whole history so far, i.e. turn t-1's
  prompt, the assistant's reply to it, and the next user message. The replies are fixed snippets of
  real text (a replayable workload can't wait for the model's own), and each turn's max_tokens is its
  reply's length, so every system generates what the transcript says the assistant did.

Shared parts end at a line break and the text after it starts with a non-blank character, so a
byte-level BPE never merges across the boundary: the shared part's token ids are the same in every
prompt that contains it.
"""

from __future__ import annotations

import itertools
import math
import random
from dataclasses import dataclass

from pagedserve.bench import prompts
from pagedserve.bench.text_source import count_tokens, reference_lines, take_tokens
from pagedserve.bench.workloads import Workload, WorkloadRequest, scale_max_tokens

# Which load_workload options each generator takes.
OPTIONS = {"prefix": ("prefix_tokens",), "chat": ("conversations", "turns", "think_time")}

PREFIX_HEADER = "Answer the question that follows this reference text.\nReference text:\n"
QUESTION_FORMS = [
    "What is {topic}?", "Why does {topic} matter?", "Give one example of {topic} in everyday life.",
    "What is the most common misconception about {topic}?", "How would you explain {topic} to {audience}?",
    "What are the main trade-offs of {topic}?", "Summarize the history of {topic} in two sentences.",
]
PREFIX_OUTPUT_TOKENS = (16, 64)

CHAT_SYSTEM = "A conversation between a curious user and a helpful assistant.\n"
FIRST_MESSAGES = (prompts.what_is, prompts.explain, prompts.short_story, prompts.python_code, prompts.translate)
FOLLOW_UPS = [
    "Thanks. Can you go into more detail on the second point?", "Could you give me a concrete example of that?",
    "How would you explain the same thing to {audience}?", "What is the most common mistake people make here?",
    "How does that compare with {topic}?", "Can you summarize your answer in two sentences?",
    "Interesting. What would change in {place}?", "What should I read next to learn more about {topic}?",
    "Is there anything in your answer that experts still disagree about?",
    "Please rewrite that as a short numbered list.",
]
REPLY_TOKENS = (32, 96)


def _token_meta(tokenizer) -> dict:
    source, _ = reference_lines()
    return {"text_source": source,
            "token_counts": "tokenizer" if tokenizer is not None else "estimated (4 characters per token)"}


def _scaled(n: int, scale: float, cap: int | None) -> int:
    if scale <= 0:
        raise ValueError(f"max_tokens_scale must be > 0, got {scale}")
    return scale_max_tokens(n, scale, cap)


# --- prefix ------------------------------------------------------------------------------------------


def shared_prefix_text(prefix_tokens: int, tokenizer=None) -> str:
    """The system prompt every `prefix` request starts with: about `prefix_tokens` tokens, ending in a newline."""
    budget = prefix_tokens - count_tokens(PREFIX_HEADER, tokenizer) - 1  # 1: the final newline
    if budget < 1:
        raise ValueError(f"prefix_tokens must be more than the header's {prefix_tokens - budget} tokens, "
                         f"got {prefix_tokens}")
    _, lines = reference_lines()
    return PREFIX_HEADER + take_tokens(lines, 0, budget, tokenizer) + "\n"


def distinct_questions(n: int, rng: random.Random) -> list[str]:
    """`n` different short questions (numbered once the form × topic combinations run out)."""
    combos = list(itertools.product(QUESTION_FORMS, prompts.TOPICS))
    rng.shuffle(combos)
    out = []
    for i in range(n):
        form, topic = combos[i % len(combos)]
        q = form.format(topic=topic, audience=rng.choice(prompts.AUDIENCES))
        out.append(q if i < len(combos) else f"{q} (question {i + 1})")
    return out


def prefix_workload(num_requests: int | None = None, prefix_tokens: int = 1000, seed: int = 0,
                    rate: float | None = None, concurrency: int | None = None, max_tokens_scale: float = 1.0,
                    max_tokens_cap: int | None = None, tokenizer=None) -> Workload:
    """`num_requests` (default 32) requests: one shared ~`prefix_tokens`-token system prompt + a distinct question."""
    n = 32 if num_requests is None else num_requests
    if n < 1:
        raise ValueError(f"num_requests must be >= 1, got {n}")
    rng = random.Random(seed)
    prefix = shared_prefix_text(prefix_tokens, tokenizer)
    requests = []
    for i, q in enumerate(distinct_questions(n, rng)):
        max_tokens = _scaled(rng.randint(*PREFIX_OUTPUT_TOKENS), max_tokens_scale, max_tokens_cap)
        requests.append(WorkloadRequest(f"req-{i:05d}", f"{prefix}Question: {q}\nAnswer:", max_tokens,
                                        template="shared prefix + question"))
    meta = {"generator": "prefix", "prefix_tokens": prefix_tokens,
            "prefix_token_count": count_tokens(prefix, tokenizer), "prefix_chars": len(prefix),
            **_token_meta(tokenizer), "max_tokens_scale": max_tokens_scale, "max_tokens_cap": max_tokens_cap}
    return Workload("prefix", requests, seed=seed, meta=meta).with_arrivals(rate, concurrency, seed)


# --- chat --------------------------------------------------------------------------------------------


@dataclass
class Conversation:
    user: list[str]  # one message per turn
    replies: list[str]  # the assistant's reply to each turn
    gaps: list[float]  # seconds between a turn's arrival and the next one's (think time)


def sentence_starts(lines: tuple[str, ...]) -> list[int]:
    """Lines that begin a sentence (capitalised, after a line that ended one), where replies start."""
    out = [i for i in range(1, len(lines)) if lines[i][0].isupper() and lines[i - 1].endswith((".", ":"))]
    return out or list(range(len(lines)))


def _reply(lines: tuple[str, ...], starts: list[int], rng: random.Random, tokenizer) -> str:
    """A snippet of real text of about REPLY_TOKENS tokens on one line, ending at a sentence's end if it can."""
    text = take_tokens(lines, rng.choice(starts), rng.randint(*REPLY_TOKENS), tokenizer, sep=" ")
    end = text.rfind(". ")
    return text[:end + 1] if end > len(text) // 2 else text


def make_conversations(n: int, turns: int, seed: int = 0, think_time: float = 5.0,
                       tokenizer=None) -> list[Conversation]:
    if n < 1 or turns < 1:
        raise ValueError(f"conversations and turns must be >= 1, got {n} and {turns}")
    if think_time < 0:
        raise ValueError(f"think_time must be >= 0 seconds, got {think_time}")
    rng = random.Random(seed)
    _, lines = reference_lines()
    starts = sentence_starts(lines)
    convs = []
    for _ in range(n):
        follow_ups = rng.sample(FOLLOW_UPS, len(FOLLOW_UPS))  # no question twice (until they run out)
        user = [rng.choice(FIRST_MESSAGES)(rng)]
        user += [prompts._fill(rng, follow_ups[i % len(follow_ups)], rng.choice(prompts.TOPICS))
                 for i in range(turns - 1)]
        replies = [_reply(lines, starts, rng, tokenizer) for _ in range(turns)]
        gaps = [rng.expovariate(1 / think_time) if think_time > 0 else 0.0 for _ in range(turns - 1)]
        convs.append(Conversation(user, replies, gaps))
    return convs


def turn_prompt(conv: Conversation, t: int) -> str:
    """Turn t's prompt (0-based): the system line, every earlier exchange, then user message t."""
    history = "".join(f"User: {u}\nAssistant: {a}\n" for u, a in zip(conv.user[:t], conv.replies[:t], strict=True))
    return f"{CHAT_SYSTEM}{history}User: {conv.user[t]}\nAssistant:"


def chat_workload(num_requests: int | None = None, conversations: int | None = None, turns: int = 4,
                  think_time: float = 5.0, seed: int = 0, rate: float | None = None, concurrency: int | None = None,
                  max_tokens_scale: float = 1.0, max_tokens_cap: int | None = None, tokenizer=None) -> Workload:
    """`conversations` (default: enough for `num_requests`, else 8) conversations of `turns` turns each.

    Turn t+1 arrives a think time (exponential, mean `think_time` s, seeded) after turn t arrived; the
    conversations start all at once or, with `rate`, as a Poisson process of `rate` conversations/s.
    `num_requests` keeps the first N requests, whole conversations first.
    """
    if conversations is None:
        conversations = math.ceil(num_requests / turns) if num_requests else 8
    convs = make_conversations(conversations, turns, seed, think_time, tokenizer)
    requests = []
    for ci, conv in enumerate(convs):
        offset = 0.0
        for t in range(turns):
            max_tokens = _scaled(count_tokens(conv.replies[t], tokenizer), max_tokens_scale, max_tokens_cap)
            requests.append(WorkloadRequest(f"c{ci:04d}-t{t:02d}", turn_prompt(conv, t), max_tokens,
                                            arrival_offset=offset, template=f"turn {t + 1}",
                                            conversation=f"c{ci:04d}", turn=t))
            offset += conv.gaps[t] if t < turns - 1 else 0.0
    if num_requests is not None:
        if num_requests < 1:
            raise ValueError(f"num_requests must be >= 1, got {num_requests}")
        requests = requests[:num_requests]
    meta = {"generator": "chat", "turns": turns, "think_time_s": think_time, **_token_meta(tokenizer),
            "max_tokens_scale": max_tokens_scale, "max_tokens_cap": max_tokens_cap}
    return Workload("chat", requests, seed=seed, meta=meta).with_arrivals(rate, concurrency, seed)
