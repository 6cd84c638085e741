"""Request: one sequence in the engine core — its state machine, token ids and scheduling times.

Plain data only (ids, seeds, numbers): a Request pickles, so the core can live in another process.
The sampler's random generator for a seeded request is built from `seed` by the model runner, and the
text side (prompt string, detokenizer, logprob strings) lives in the front end's output processor.
"""

from __future__ import annotations

import enum
import time

from pagedserve.pooling_params import PoolingParams
from pagedserve.sampling_params import SamplingParams


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    PREEMPTED = "preempted"  # blocks freed; waits to be recomputed (fcfs: at the front of the queue)
    FINISHED_STOPPED = "stop"
    FINISHED_LENGTH = "length"
    FINISHED_ABORTED = "abort"

    @property
    def finished(self) -> bool:
        return self in (RequestStatus.FINISHED_STOPPED, RequestStatus.FINISHED_LENGTH,
                        RequestStatus.FINISHED_ABORTED)


class Request:
    """One sequence. `n > 1` requests reach the core as n of these (one per sample). A pooling
    request (`pooling_params`, an embedding) computes its prompt and finishes: nothing is sampled."""

    def __init__(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                 eos_token_id: int | None = None, arrival_time: float | None = None,
                 seed: int | None = None, cache_salt: str | None = None,
                 pooling_params: PoolingParams | None = None, priority: int = 0) -> None:
        self.request_id = request_id
        self.prompt_token_ids = list(prompt_token_ids)
        self.output_token_ids: list[int] = []
        self.params = params
        self.pooling_params = pooling_params  # its pooling_type already filled in by the engine core
        self.eos_token_id = eos_token_id
        self.seed = seed
        self.status = RequestStatus.WAITING
        self.num_computed_tokens = 0  # tokens whose K/V sit in the cache
        # Proposed tokens to verify in the next step (speculative decoding); they sit after the
        # known tokens and become output tokens only once the runner accepts them.
        self.spec_token_ids: list[int] = []
        self.arrival_time = time.monotonic() if arrival_time is None else arrival_time
        self.priority = priority  # lower is served first (--scheduling-policy priority only)
        self.queue_order = 0  # the scheduler's arrival counter: breaks ties of equal arrival times
        self.first_scheduled_time: float | None = None
        self.num_preemptions = 0
        self.stop_reason: int | str | None = None
        self.cache_salt = cache_salt
        self.block_hashes: list[bytes] = []  # of its full blocks, filled in by the KV manager
        self.num_offered_blocks = 0  # leading blocks of its table already offered to the prefix cache
        self.num_cached_tokens: int | None = None  # prompt tokens its first admission found cached
        self.prompt_logprobs: list = []  # RawLogprobs of prompt tokens 1.., gathered chunk by chunk
        self.beam_group: str | None = None  # a beam of this beam search (its logits rows go to the group)

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    def token_ids_between(self, start: int, end: int) -> list[int]:
        """Token ids at positions [start, end), spec tokens after the known ones included."""
        known = self.num_tokens
        ids = self.all_token_ids[start:min(end, known)]
        if end > known:
            ids += self.spec_token_ids[max(0, start - known):end - known]
        return ids

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def num_tokens_with_spec(self) -> int:
        return self.num_tokens + len(self.spec_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def max_total_tokens(self) -> int:
        """Tokens this request may hold in the KV cache at most (prompt + max_tokens; a pooling
        request holds its prompt only)."""
        if self.pooling_params is not None:
            return self.num_prompt_tokens
        return self.num_prompt_tokens + (self.params.max_tokens or 0)

    @property
    def skip_prefix_cache(self) -> bool:
        """Prompt logprobs need every prompt position's logits, and MEAN pooling every prompt token's
        hidden state, so such a request computes its whole prompt instead of taking cache hits (its
        computed blocks are still offered to others)."""
        if self.pooling_params is not None and self.pooling_params.needs_every_token:
            return True
        return self.params.prompt_logprobs is not None

    @property
    def is_finished(self) -> bool:
        return self.status.finished

    def __repr__(self) -> str:
        return (f"Request({self.request_id!r}, {self.status.value}, prompt={self.num_prompt_tokens}, "
                f"out={len(self.output_token_ids)}, computed={self.num_computed_tokens})")
