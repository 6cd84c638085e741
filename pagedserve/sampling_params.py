"""SamplingParams: how one request is decoded. Validates itself with messages naming the field."""

from __future__ import annotations

import math
from dataclasses import dataclass

from pagedserve.structured_output.params import StructuredOutputsParams

MAX_LOGPROBS = 20
MAX_BEAM_WIDTH = 64
MAX_LOGIT_BIAS = 100.0  # OpenAI's range: -100 bans a token, +100 all but forces it


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


@dataclass
class SamplingParams:
    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    max_tokens: int | None = 16
    min_tokens: int = 0
    stop: list[str] | str | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    logprobs: int | None = None
    prompt_logprobs: int | None = None  # per prompt token: its logprob and the top-N at its position
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    logit_bias: dict[int, float] | None = None  # token id -> added to its logit before sampling
    structured_outputs: StructuredOutputsParams | None = None  # the output must match this grammar

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        if self.logit_bias is not None and not isinstance(self.logit_bias, dict):
            raise ValueError(f"logit_bias must be a mapping of token id to bias, got {self.logit_bias!r}")
        self.logit_bias = dict(self.logit_bias) if self.logit_bias else None
        if self.structured_outputs is not None and not isinstance(self.structured_outputs, StructuredOutputsParams):
            raise ValueError(f"structured_outputs must be a StructuredOutputsParams, got {self.structured_outputs!r}")
        self._validate()

    def _validate(self) -> None:
        def check(ok: bool, name: str, allowed: str, value: object) -> None:
            if not ok:
                raise ValueError(f"{name} must be {allowed}, got {value!r}")

        def is_int(v: object) -> bool:
            return isinstance(v, int) and not isinstance(v, bool)

        def is_num(v: object) -> bool:
            return isinstance(v, (int, float)) and not isinstance(v, bool)

        check(is_int(self.n) and 1 <= self.n <= 64, "n", "an integer in [1, 64]", self.n)
        check(is_num(self.temperature) and 0.0 <= self.temperature <= 100.0,
              "temperature", "a number in [0, 100] (0 means greedy)", self.temperature)
        check(is_num(self.top_p) and 0.0 < self.top_p <= 1.0, "top_p", "a number in (0, 1]", self.top_p)
        check(is_int(self.top_k) and (self.top_k == -1 or self.top_k >= 1),
              "top_k", "-1 (disabled) or an integer >= 1", self.top_k)
        check(is_num(self.min_p) and 0.0 <= self.min_p <= 1.0, "min_p", "a number in [0, 1]", self.min_p)
        check(is_num(self.repetition_penalty) and 0.0 < self.repetition_penalty <= 2.0,
              "repetition_penalty", "a number in (0, 2]", self.repetition_penalty)
        check(is_num(self.presence_penalty) and -2.0 <= self.presence_penalty <= 2.0,
              "presence_penalty", "a number in [-2, 2]", self.presence_penalty)
        check(is_num(self.frequency_penalty) and -2.0 <= self.frequency_penalty <= 2.0,
              "frequency_penalty", "a number in [-2, 2]", self.frequency_penalty)
        check(self.seed is None or is_int(self.seed), "seed", "an integer or None", self.seed)
        check(self.max_tokens is None or (is_int(self.max_tokens) and self.max_tokens >= 1),
              "max_tokens", "an integer >= 1 or None", self.max_tokens)
        check(is_int(self.min_tokens) and self.min_tokens >= 0, "min_tokens", "an integer >= 0", self.min_tokens)
        if self.max_tokens is not None:
            check(self.min_tokens <= self.max_tokens, "min_tokens", f"<= max_tokens ({self.max_tokens})",
                  self.min_tokens)
        check(all(isinstance(s, str) and s for s in self.stop), "stop", "non-empty strings", self.stop)
        check(all(is_int(t) and t >= 0 for t in self.stop_token_ids),
              "stop_token_ids", "non-negative integers", self.stop_token_ids)
        check(self.logprobs is None or (is_int(self.logprobs) and 0 <= self.logprobs <= MAX_LOGPROBS),
              "logprobs", f"an integer in [0, {MAX_LOGPROBS}] or None", self.logprobs)
        check(self.prompt_logprobs is None or (is_int(self.prompt_logprobs) and 0 <= self.prompt_logprobs <= MAX_LOGPROBS),
              "prompt_logprobs", f"an integer in [0, {MAX_LOGPROBS}] or None", self.prompt_logprobs)
        for token, bias in (self.logit_bias or {}).items():
            check(is_int(token) and token >= 0, "logit_bias", "keyed by non-negative token ids", token)
            check(is_num(bias) and -MAX_LOGIT_BIAS <= bias <= MAX_LOGIT_BIAS, "logit_bias",
                  f"biases in [-{MAX_LOGIT_BIAS:g}, {MAX_LOGIT_BIAS:g}]", bias)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def needs_penalties(self) -> bool:
        return self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0


@dataclass
class BeamSearchParams:
    """Beam search request options (vLLM's offline API names, HF's semantics)."""

    beam_width: int
    max_tokens: int
    ignore_eos: bool = False
    temperature: float = 0.0  # > 0: the engine divides logits by it before log_softmax (see beam_logprobs)
    length_penalty: float = 1.0
    early_stopping: bool | str = False  # HF's: True, False or "never"

    def __post_init__(self) -> None:
        if not isinstance(self.beam_width, int) or isinstance(self.beam_width, bool) \
                or not 1 <= self.beam_width <= MAX_BEAM_WIDTH:
            raise ValueError(f"beam_width must be an integer in [1, {MAX_BEAM_WIDTH}], got {self.beam_width!r}")
        if not isinstance(self.max_tokens, int) or isinstance(self.max_tokens, bool) or self.max_tokens < 1:
            raise ValueError(f"max_tokens must be an integer >= 1, got {self.max_tokens!r}")
        if not _is_number(self.length_penalty) or not math.isfinite(self.length_penalty):
            raise ValueError(f"length_penalty must be a finite number, got {self.length_penalty!r}")
        # `is` checks: 1 == True and 0 == False must not slip through as booleans.
        if not (self.early_stopping is True or self.early_stopping is False or self.early_stopping == "never"):
            raise ValueError(f"early_stopping must be True, False or 'never', got {self.early_stopping!r}")
        if not _is_number(self.temperature) or not self.temperature >= 0 or not math.isfinite(self.temperature):
            raise ValueError(f"temperature must be a number >= 0, got {self.temperature!r}")
        if not isinstance(self.ignore_eos, bool):
            raise ValueError(f"ignore_eos must be True or False, got {self.ignore_eos!r}")
