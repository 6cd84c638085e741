"""What the engine hands back: RequestOutput with one CompletionOutput per sample (a pooling request:
its vector in `pooling_output`), and `LLM.embed`'s EmbeddingRequestOutput."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Logprob:
    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


@dataclass
class RequestMetrics:
    """Timestamps (time.monotonic seconds) and the latencies derived from them."""

    arrival_time: float
    first_scheduled_time: float | None
    first_token_time: float | None
    finished_time: float | None
    token_times: list[float] = field(default_factory=list)
    num_preemptions: int = 0

    @property
    def queue_time(self) -> float | None:
        return None if self.first_scheduled_time is None else self.first_scheduled_time - self.arrival_time

    @property
    def ttft(self) -> float | None:
        return None if self.first_token_time is None else self.first_token_time - self.arrival_time

    @property
    def inter_token_latencies(self) -> list[float]:
        """Gaps between deliveries: tokens one step accepted together (speculative decoding) arrive at
        once and count as one, as vLLM counts an iteration."""
        t = self.token_times
        return [b - a for a, b in zip(t, t[1:], strict=False) if b != a]

    @property
    def mean_itl(self) -> float | None:
        itl = self.inter_token_latencies
        return sum(itl) / len(itl) if itl else None

    @property
    def e2e_latency(self) -> float | None:
        return None if self.finished_time is None else self.finished_time - self.arrival_time


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    logprobs: list[dict[int, Logprob]] | None = None
    finish_reason: str | None = None  # "stop" | "length" | "abort" | None while running
    stop_reason: int | str | None = None  # the stop string or stop token id that ended it
    text_delta: str = ""  # text released since the previous output (streaming)
    token_ids_delta: list[int] = field(default_factory=list)
    cumulative_logprob: float | None = None  # beam search: the beam's summed logprob (its score ranks it)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    metrics: RequestMetrics | None = None
    num_cached_tokens: int | None = None  # prompt tokens served from the prefix cache (None until admitted)
    # With SamplingParams.prompt_logprobs: per prompt token, its logprob dict (None for the first token).
    prompt_logprobs: list[dict[int, Logprob] | None] | None = None
    # A pooling request (PoolingParams): its vector, on its one output (finished, no tokens).
    pooling_output: list[float] | None = None


@dataclass
class EmbeddingOutput:
    embedding: list[float]

    @property
    def hidden_size(self) -> int:
        return len(self.embedding)


@dataclass
class EmbeddingRequestOutput:
    """What `LLM.embed` returns per prompt (vLLM's shape)."""

    request_id: str
    outputs: EmbeddingOutput
    prompt_token_ids: list[int]
    finished: bool = True

    @classmethod
    def from_base(cls, out: RequestOutput) -> EmbeddingRequestOutput:
        if out.pooling_output is None:
            raise ValueError(f"request {out.request_id!r} has no pooled output (finish reason "
                             f"{out.outputs[0].finish_reason if out.outputs else None!r})")
        return cls(out.request_id, EmbeddingOutput(list(out.pooling_output)), out.prompt_token_ids, out.finished)
