"""LLMEngine: the synchronous engine — input processor, EngineCore, output processor, in one thread.

    add_request(id, prompt, params)  -> input processor -> core.add_request (n sequences)
    step()                           -> core.step() -> output processor -> RequestOutputs
    abort_request(ids)               -> output processor (final "abort" output) + core.abort_requests

`LLM` and the async server loop drive it; neither reaches into the core for anything else.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Sequence

from pagedserve.config import EngineConfig
from pagedserve.core.kv_cache_manager import BlockInfo, KVCacheStats
from pagedserve.engine.core import EngineCore, StepRecord
from pagedserve.engine.input_processor import EngineInput, InputError, InputProcessor, PromptType
from pagedserve.engine.output_processor import OutputProcessor
from pagedserve.engine.protocol import EngineStats, ModelInfo
from pagedserve.model.loader import load_tokenizer
from pagedserve.outputs import RequestOutput
from pagedserve.pooling_params import PoolingParams
from pagedserve.sampling_params import BeamSearchParams, SamplingParams

__all__ = ["LLMEngine", "PromptType", "StepRecord"]


class LLMEngine:
    def __init__(self, config: EngineConfig) -> None:
        self.core = EngineCore(config)
        self.tokenizer = load_tokenizer(self.core.model_path)
        self.core.tokenizer = self.tokenizer  # for the grammar compiler's vocabulary tables
        eos = self.tokenizer.eos_token_id
        if eos is None:
            eos = self.core.model_config.eos_token_id
        self.eos_token_id = eos[0] if isinstance(eos, list) else eos
        self.input_processor = InputProcessor(self.tokenizer, self.core.model_config.vocab_size,
                                              self.core.max_model_len, self.core.capacity_tokens,
                                              self.eos_token_id, config.model, config.scheduler.scheduling_policy,
                                              self.core.model_config.hidden_size)
        self.output_processor = OutputProcessor(self.tokenizer)
        self._pending_outputs: list[RequestOutput] = []  # abort outputs, handed out by the next step
        self._ids = itertools.count()

    # --- what the core owns, for tests, tools and benchmarks --------------------------------------

    @property
    def config(self) -> EngineConfig:
        return self.core.config

    @property
    def model(self):
        return self.core.model

    @property
    def model_config(self):
        return self.core.model_config

    @property
    def model_path(self):
        return self.core.model_path

    @property
    def scheduler(self):
        return self.core.scheduler

    @property
    def runner(self):
        return self.core.runner

    @property
    def kv(self):
        return self.core.kv

    @property
    def max_model_len(self) -> int:
        return self.core.max_model_len

    @property
    def capacity_tokens(self) -> int:
        return self.core.capacity_tokens

    @property
    def record_steps(self) -> bool:
        return self.core.record_steps

    @record_steps.setter
    def record_steps(self, value: bool) -> None:
        self.core.record_steps = value

    @property
    def step_records(self) -> list[StepRecord]:
        return self.core.step_records

    def kv_stats(self) -> KVCacheStats:
        return self.core.kv_stats()

    def enable_live_view(self) -> None:
        """Keep the live page's history and request traces from now on (engine/live_view.py)."""
        self.core.enable_live_view()

    def live_snapshot(self, max_cells: int, max_rows: int) -> dict | None:
        view = self.core.live_view
        return None if view is None else view.snapshot(max_cells, max_rows)

    def live_block(self, block_id: int) -> dict | None:
        view = self.core.live_view
        return None if view is None else view.block(block_id)

    def live_request_trace(self, request_id: str) -> dict | None:
        view = self.core.live_view
        return None if view is None else view.request_trace(request_id)

    def kv_snapshot(self) -> list[BlockInfo]:
        return self.core.kv_snapshot()

    def reset_prefix_cache(self) -> bool:
        return self.core.reset_prefix_cache()

    def stats(self) -> EngineStats:
        s = self.core.scheduler.stats()
        return EngineStats(s.num_running, s.num_waiting, s.num_preemptions, self.core.kv_stats(),
                           self.core.spec_decode_stats())

    def model_info(self, served_model_name: str | None = None) -> ModelInfo:
        return ModelInfo(served_model_name or self.config.model, str(self.model_path), self.max_model_len,
                         self.model_config.vocab_size, self.capacity_tokens, self.config.scheduler.max_num_seqs)

    # --- requests -----------------------------------------------------------------------------

    def process_input(self, request_id: str | None, prompt: PromptType,
                      params: SamplingParams | BeamSearchParams | PoolingParams | None = None,
                      arrival_time: float | None = None, priority: int = 0) -> EngineInput:
        request_id = str(next(self._ids)) if request_id is None else request_id
        arrival = time.monotonic() if arrival_time is None else arrival_time
        if isinstance(params, BeamSearchParams):
            return self.input_processor.process_beam_search(request_id, prompt, params, arrival, priority)
        if isinstance(params, PoolingParams):  # an embedding: the prompt only, answered with its vector
            return self.input_processor.process_pooling(request_id, prompt, params, arrival, priority=priority)
        return self.input_processor.process(request_id, prompt, params, arrival, priority=priority)

    def add_request(self, request_id: str | None, prompt: PromptType,
                    params: SamplingParams | BeamSearchParams | PoolingParams | None = None,
                    arrival_time: float | None = None, priority: int = 0) -> str:
        """Validate and queue a request. Raises ValueError (naming the field) before touching the engine.
        `priority`: lower is served first; non-zero needs scheduling_policy="priority"."""
        return self.add_processed(self.process_input(request_id, prompt, params, arrival_time, priority))

    def add_processed(self, request: EngineInput) -> str:
        """Queue a request the input processor has already validated (the server's path)."""
        if request.request_id in self.output_processor:
            raise InputError(f"request_id {request.request_id!r} is already in use", "request_id")
        core_requests = request.core_requests()
        self.output_processor.add_request(request, [r.request_id for r in core_requests])
        try:
            for r in core_requests:
                self.core.add_request(r)
        except Exception:  # the core refused it: leave nothing of it behind, on either side
            self.abort_request(request.request_id)
            raise
        return request.request_id

    def abort_request(self, request_id: str | Sequence[str]) -> None:
        ids = [request_id] if isinstance(request_id, str) else list(request_id)
        for rid in ids:
            result = self.output_processor.abort_request(rid)
            if result is None:
                continue
            output, core_ids = result
            self.core.abort_requests(core_ids)
            self._pending_outputs.append(output)

    def has_unfinished_requests(self) -> bool:
        return bool(len(self.output_processor)) or bool(self._pending_outputs)

    def get_num_unfinished_requests(self) -> int:
        return len(self.output_processor)

    def running_request_ids(self) -> list[str]:
        """Ids of the requests with a sequence in the running batch (what a failed step was working on)."""
        ids = (self.output_processor.request_id_of(cid) for cid in self.core.running_request_ids())
        return sorted({rid for rid in ids if rid is not None})

    # --- the step -----------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        outputs, self._pending_outputs = self._pending_outputs, []
        try:
            core_outputs = self.core.step()
        except Exception:
            self._pending_outputs = outputs + self._pending_outputs  # keep abort outputs for the next step
            raise
        processed = self.output_processor.process_outputs(core_outputs)
        if processed.reqs_to_abort:  # stopped on a stop string: give the blocks back before the next step
            self.core.abort_requests(processed.reqs_to_abort)
        return outputs + processed.request_outputs
