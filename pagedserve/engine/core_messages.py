"""What crosses between the front end and the engine core: plain, picklable data.

The front end (input processor) turns a prompt into an EngineCoreRequest; the core answers every
step with one EngineCoreOutput per request that made progress: new token ids (a list: one step may
accept several), raw logprobs, and a finish reason once the core stopped it on token ids (EOS, a stop
token, max_tokens, the context length); a pooling request gets one, finished, with its vector. Text —
detokenizing, stop strings, logprob strings — is the front end's (output processor).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from pagedserve.core.beam_search import BeamHypothesis, BeamSearchParams
from pagedserve.pooling_params import PoolingParams
from pagedserve.sampling_params import SamplingParams

# Per sampled token: (its logprob, [(token id, logprob)] top-N of the final distribution).
RawLogprob = tuple[float, list[tuple[int, float]]]


@dataclass
class EngineCoreRequest:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams  # already validated and completed (max_tokens set) by the input processor
    eos_token_id: int | None
    arrival_time: float
    seed: int | None = None
    cache_salt: str | None = None  # only requests with the same salt share cached prefix blocks
    # n > 1: the sibling whose prompt this sequence shares (the core forks it from that one's blocks
    # once its prompt is computed, instead of computing the prompt again).
    fork_of: str | None = None
    beam_search: BeamSearchParams | None = None  # beam search in the core instead of sampling
    priority: int = 0  # lower is served first (--scheduling-policy priority); n > 1 siblings share it
    pooling_params: PoolingParams | None = None  # a prompt-only request answered with its pooled vector


@dataclass
class EngineCoreOutput:
    request_id: str
    new_token_ids: list[int]
    new_logprobs: list[RawLogprob] | None = None
    finish_reason: str | None = None  # "stop" | "length" | "abort"
    stop_reason: int | None = None  # the stop token id that ended it (None for EOS / length)
    first_scheduled_time: float | None = None
    num_preemptions: int = 0
    num_cached_tokens: int | None = None  # on the first output: prompt tokens served from the prefix cache
    prompt_logprobs: list[RawLogprob] | None = None  # on the first output: prompt tokens 1.. (when asked)
    beams: list[BeamHypothesis] | None = None  # a finished beam search: its beams, best first
    pooling_output: list[float] | None = None  # a finished pooling request: its pooled vector (float32 values)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class EngineCoreOutputs:
    """One step's outputs; `timestamp` (time.monotonic, the same clock in every process of the host)
    is when the step's tokens were known."""

    outputs: list[EngineCoreOutput] = field(default_factory=list)
    timestamp: float = 0.0
