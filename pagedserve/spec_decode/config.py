"""SpeculativeConfig: which proposer drafts tokens and how many, under vLLM's field names (so a
vLLM user's `speculative_config` carries over), validated once at start with messages naming the field."""

from __future__ import annotations

import json
from dataclasses import dataclass, fields

METHODS = ("ngram", "draft_model", "layer_skip")
MAX_SPECULATIVE_TOKENS = 16


@dataclass
class SpeculativeConfig:
    method: str
    num_speculative_tokens: int
    # ngram: the longest n-gram of the context's tail, with min <= n <= max, found earlier in the context
    # proposes what followed it there. vLLM's rule when one is missing: it takes the other's value.
    prompt_lookup_min: int | None = None
    prompt_lookup_max: int | None = None
    model: str | None = None  # draft_model: a smaller model with the target's tokenizer
    num_draft_layers: int | None = None  # layer_skip: the target's first m layers are the draft
    # Speculation is off for a step whose running batch is at least this large; None (default): decided
    # every step from the measured step costs and acceptance (see spec_decode/controller.py).
    disable_by_batch_size: int | None = None

    def __post_init__(self) -> None:
        def check(ok: bool, name: str, allowed: str, value: object) -> None:
            if not ok:
                raise ValueError(f"speculative_config.{name} must be {allowed}, got {value!r}")

        def is_int(v: object) -> bool:
            return isinstance(v, int) and not isinstance(v, bool)

        check(self.method in METHODS, "method", f"one of {METHODS}", self.method)
        check(is_int(self.num_speculative_tokens) and 1 <= self.num_speculative_tokens <= MAX_SPECULATIVE_TOKENS,
              "num_speculative_tokens", f"an integer in [1, {MAX_SPECULATIVE_TOKENS}]", self.num_speculative_tokens)
        check(self.disable_by_batch_size is None or (is_int(self.disable_by_batch_size)
                                                      and self.disable_by_batch_size >= 1),
              "disable_by_batch_size", "an integer >= 1 or null", self.disable_by_batch_size)
        if self.method == "ngram":
            if self.prompt_lookup_min is None and self.prompt_lookup_max is None:
                self.prompt_lookup_min, self.prompt_lookup_max = 2, 5
            elif self.prompt_lookup_min is None:
                self.prompt_lookup_min = self.prompt_lookup_max
            elif self.prompt_lookup_max is None:
                self.prompt_lookup_max = self.prompt_lookup_min
            check(is_int(self.prompt_lookup_min) and self.prompt_lookup_min >= 1, "prompt_lookup_min",
                  "an integer >= 1", self.prompt_lookup_min)
            check(is_int(self.prompt_lookup_max) and self.prompt_lookup_max >= self.prompt_lookup_min,
                  "prompt_lookup_max", f"an integer >= prompt_lookup_min ({self.prompt_lookup_min})",
                  self.prompt_lookup_max)
        if self.method == "draft_model":
            check(isinstance(self.model, str) and bool(self.model), "model",
                  "the draft model (a known name, GGUF file or HF folder) for method 'draft_model'", self.model)
        if self.method == "layer_skip":
            check(is_int(self.num_draft_layers) and self.num_draft_layers >= 1, "num_draft_layers",
                  "an integer >= 1 for method 'layer_skip'", self.num_draft_layers)

    @property
    def needs_lookahead_slots(self) -> bool:
        """Model-based drafts write K/V for their own tokens past the verified ones (ngram writes none)."""
        return self.method != "ngram"

    @classmethod
    def parse(cls, value: SpeculativeConfig | dict | str | None) -> SpeculativeConfig | None:
        """A config, a dict, or JSON text (as `--speculative-config` takes it)."""
        if value is None or isinstance(value, SpeculativeConfig):
            return value
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except json.JSONDecodeError as exc:
                raise ValueError(f"speculative_config must be a JSON object: {exc}") from None
        if not isinstance(value, dict):
            raise ValueError(f"speculative_config must be an object, got {type(value).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(value) - known)
        if unknown:
            raise ValueError(f"speculative_config has unknown field(s) {unknown}; allowed: {sorted(known)}")
        for required in ("method", "num_speculative_tokens"):
            if required not in value:
                raise ValueError(f"speculative_config.{required} is required")
        return cls(**value)
