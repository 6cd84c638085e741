"""EngineClient: the one interface the server, its metrics and anything later (a router, a web page)
use to talk to an engine, wherever its core runs. Nothing on this side of it touches the scheduler,
the KV manager or the model."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from pagedserve.core.kv_cache_manager import BlockInfo, KVCacheStats
from pagedserve.core.kv_events import KVEventLog
from pagedserve.engine.input_processor import EngineInput, InputProcessor, PromptType
from pagedserve.outputs import RequestOutput
from pagedserve.pooling_params import PoolingParams
from pagedserve.sampling_params import SamplingParams
from pagedserve.spec_decode.stats import SpecDecodeStats


@dataclass
class EngineStats:
    num_running: int  # sequences in the running batch
    num_waiting: int  # sequences waiting (preempted ones included)
    num_preemptions: int  # since the start
    kv: KVCacheStats
    spec_decode: SpecDecodeStats | None = None  # speculative decoding's counters, when it is on


@dataclass
class ModelInfo:
    name: str  # the name clients use
    path: str
    max_model_len: int
    vocab_size: int
    capacity_tokens: int  # KV cache slots in all
    max_num_seqs: int


# Called after every engine step with the engine's figures and the outputs about to be delivered
# (the server's metrics); it runs on the engine's side, so it must be quick and thread-safe.
StepHook = Callable[[EngineStats, list[RequestOutput]], None]


class EngineClient(ABC):
    on_step: StepHook | None = None
    max_in_flight: int  # requests admitted at most (running + queued); more are refused

    # --- lifecycle (called from the event loop) --------------------------------------------------

    @abstractmethod
    def start(self) -> None:
        """Start serving (on the running event loop)."""

    @abstractmethod
    async def stop(self) -> None:
        """Abort what is in flight and stop."""

    @abstractmethod
    def drain_threadsafe(self, grace_s: float) -> None:
        """Admit nothing more; abort what still runs after `grace_s` (from a signal handler)."""

    @abstractmethod
    def has_capacity(self, num_requests: int = 1) -> bool: ...

    @property
    @abstractmethod
    def num_in_flight(self) -> int: ...

    # --- requests ---------------------------------------------------------------------------------

    @abstractmethod
    async def add_request(self, request_id: str, prompt: PromptType | EngineInput,
                          params: SamplingParams | PoolingParams | None = None,
                          arrival_time: float | None = None,
                          priority: int = 0) -> AsyncIterator[RequestOutput]:
        """Queue a request (a prompt, or one the input processor already validated) and return the
        stream of its outputs; raises ValueError when it is refused, before it reaches the core.
        `priority` (lower first) needs the priority scheduling policy when non-zero. With
        PoolingParams (an embedding) the stream has one output, finished, its vector in `pooling_output`."""

    @abstractmethod
    def abort(self, request_id: str) -> None:
        """Stop a request and free its blocks; its stream ends. A request that has ended already (or was
        never known) is ignored."""

    @abstractmethod
    async def stats(self) -> EngineStats: ...

    @abstractmethod
    def initial_stats(self) -> EngineStats:
        """The figures before `start()` (the server's gauges start from them)."""

    @abstractmethod
    def model_info(self) -> ModelInfo: ...

    @abstractmethod
    async def kv_snapshot(self) -> list[BlockInfo]: ...

    # --- the live page (engine/live_view.py); a client without one answers None -------------------

    async def live_snapshot(self, max_cells: int, max_rows: int) -> dict | None:
        """The block map, queues and history, bounded by `max_cells` map cells and `max_rows` rows per queue."""
        return None

    async def live_block(self, block_id: int) -> dict | None:
        """One block in full (owners, ref count, fill, hash prefix); None for an unknown id."""
        return None

    async def live_request_trace(self, request_id: str) -> dict | None:
        """A live, waiting or recently finished request's span tree (OTLP/JSON); None if unknown."""
        return None

    def kv_events(self) -> KVEventLog | None:
        """The prefix cache's block stored/removed events (thread-safe to read), or None when this engine
        publishes none (prefix caching off, or a client that cannot reach them)."""
        return None

    def kv_block_size(self) -> int | None:
        """Tokens per KV block, which the events' block hashes are computed over."""
        return None

    @abstractmethod
    async def reset_prefix_cache(self) -> bool:
        """Forget every cached prefix block; False (nothing done) while requests still hold blocks."""

    @property
    @abstractmethod
    def input_processor(self) -> InputProcessor:
        """Validation and tokenization, for the front end's own use (its own tokenizer copy)."""

    @property
    @abstractmethod
    def unavailable_reason(self) -> str | None:
        """Why no new request is accepted (dead, shutting down), or None while serving."""
