"""EngineCore: the model, the paged KV cache, the scheduler and the runner, and the three-call step.

    step() = scheduler.schedule() -> model_runner.execute(scheduler_output)
             -> scheduler.update_from_output(scheduler_output, runner_output)

It takes EngineCoreRequests (token ids, validated params) and answers EngineCoreOutputs (token ids,
or a pooling request's vector); it never sees text. Everything else — tokenizing, validation,
detokenizing, stop strings, n > 1 groups, streaming — is the front end's (input_processor.py,
output_processor.py).
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Protocol

import torch

from pagedserve.config import EngineConfig
from pagedserve.core.kv_cache_manager import BlockInfo, KVCacheManager, KVCacheStats
from pagedserve.core.kv_events import KVEventLog
from pagedserve.core.request import Request
from pagedserve.core.sched.output import SchedulerOutput
from pagedserve.core.sched.scheduler import Scheduler
from pagedserve.engine.core_messages import EngineCoreOutputs, EngineCoreRequest
from pagedserve.engine.live_view import LiveView
from pagedserve.engine.request_trace import RequestTracer
from pagedserve.model.config import ModelConfig
from pagedserve.model.loader import (
    check_quantization,
    iter_quantized_rows,
    iter_weights,
    load_config,
    load_tokenizer,
    resolve_model_path,
)
from pagedserve.model.registry import model_class_for
from pagedserve.spec_decode.factory import build_speculator
from pagedserve.spec_decode.stats import SpecDecodeStats
from pagedserve.structured_output.manager import StructuredOutputManager
from pagedserve.structured_output.pending import PendingGrammars
from pagedserve.worker.cuda_graphs import build_decode_graphs
from pagedserve.worker.model_runner import ModelRunner, kv_block_bytes

# How long an otherwise idle step blocks on a compiling grammar before it returns to its caller.
GRAMMAR_WAIT_S = 0.05


class StepObserver(Protocol):
    def on_schedule(self, sched: SchedulerOutput, now: float) -> None: ...

    def on_step(self, sched: SchedulerOutput, outputs: EngineCoreOutputs, start: float, end: float) -> None: ...

    def on_abort(self, request_ids: list[str], now: float) -> None: ...


@dataclass
class StepRecord:
    """One engine step, for the benchmark's timelines."""

    start: float
    duration: float
    num_seqs: int
    num_tokens: int
    num_prefill_seqs: int
    kv: KVCacheStats
    num_waiting: int
    num_preempted: int


def build_model(config: EngineConfig, path: Path, cfg: ModelConfig) -> torch.nn.Module:
    check_quantization(path, config.quantization)
    model = model_class_for(cfg.architecture)(cfg)
    model.load_weights(iter_weights(path, cfg))
    device = torch.device(config.device)
    if device.type == "cpu" and config.torch_dtype == torch.float32:  # the only path that reads them
        model.attach_quantized(iter_quantized_rows(path, cfg))
    model = model.to(device=device, dtype=config.torch_dtype).eval()
    model.rotary.float()  # cos/sin tables stay float32 for accuracy; cast per step
    model.prepare_for_inference(config.cpu_kernels, config.decoder_stack, config.quantized_matmul,
                                config.quantization)
    return model


class EngineCore:
    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        if config.num_threads:
            torch.set_num_threads(config.num_threads)
        torch.manual_seed(config.seed)
        self.model_path = resolve_model_path(config.model)
        self.model_config = cfg = load_config(self.model_path)
        self.model = build_model(config, self.model_path, cfg)
        self.max_model_len = min(config.max_model_len or cfg.max_position_embeddings, cfg.max_position_embeddings)
        cc = config.cache
        block_bytes = kv_block_bytes(cfg, cc.block_size, config.kv_cache_torch_dtype)  # 16-bit KV: twice the blocks
        num_blocks = cc.num_blocks or max(1, int(cc.kv_cache_memory_gb * 2**30 // block_bytes))
        self.kv = KVCacheManager(num_blocks, cc.block_size, cc.enable_prefix_caching,
                                 KVEventLog() if cc.enable_prefix_caching else None)
        self.scheduler = Scheduler(config.scheduler, self.kv, self.max_model_len)
        self.runner = ModelRunner(self.model, cfg, num_blocks, cc.block_size, config.kv_cache_torch_dtype,
                                  torch.device(config.device))
        spec = config.speculative_config
        if spec is not None:
            self.runner.speculator = build_speculator(spec, self)
            if spec.needs_lookahead_slots:
                self.scheduler.num_lookahead_tokens = spec.num_speculative_tokens
        else:  # steps that verify drafts are not uniform decode steps: no graphs with speculation
            self.runner.graphs = build_decode_graphs(self.model, self.runner.kv_caches, config.scheduler.max_num_seqs,
                                                     self.max_model_len, cc.block_size, torch.device(config.device),
                                                     config.enforce_eager)
        self.pending_grammars = PendingGrammars()  # constrained requests whose grammar is compiling
        # The front end's tokenizer when both live in one process (grammars need the vocabulary; loading
        # another copy from a GGUF takes seconds); else the manager loads its own.
        self.tokenizer = None
        self.record_steps = False
        self.step_records: list[StepRecord] = []
        # Step observers (request traces, the live page's history): told what each step scheduled,
        # what it produced, and which requests were aborted. Their cost is their own; none by default.
        self.observers: list[StepObserver] = []
        self.tracer = RequestTracer(config.trace_file) if config.trace_file else None
        self.live_view: LiveView | None = None  # enable_live_view()
        if self.tracer is not None:
            self.observers.append(self.tracer)

    def structured_outputs(self) -> StructuredOutputManager:
        """The grammar manager, built (with the tokenizer's vocabulary) at the first constrained request."""
        if self.runner.structured is None:
            path = self.model_path
            tokenizer = self.tokenizer if self.tokenizer is not None else (lambda: load_tokenizer(path))
            self.runner.structured = StructuredOutputManager(tokenizer, self.model_config.vocab_size,
                                                             self.runner.sampler.ops)
        return self.runner.structured

    @property
    def capacity_tokens(self) -> int:
        return self.kv.pool.num_blocks * self.kv.block_size

    def add_request(self, request: EngineCoreRequest) -> None:
        pooling = request.pooling_params
        if pooling is not None and pooling.pooling_type is None:  # the engine's pooler config
            pooling = replace(pooling, pooling_type=self.config.pooling_type)
        req = Request(request.request_id, request.prompt_token_ids, request.params, request.eos_token_id,
                      request.arrival_time, request.seed, request.cache_salt, pooling, request.priority)
        if request.request_id in self.scheduler.requests:  # now, not when its grammar is ready
            raise ValueError(f"request_id {request.request_id!r} is already in the engine")
        if request.beam_search is not None:
            def admit() -> None:
                self.scheduler.add_beam_search(req, request.beam_search)
        else:
            def admit() -> None:
                self.scheduler.add_request(req, fork_of=request.fork_of)
        if request.params.structured_outputs is None:
            admit()
            return
        grammar = self.structured_outputs().compile_async(request.params.structured_outputs)
        if grammar.done() and not grammar.exception():
            admit()  # a cached grammar: straight to the scheduler
        else:
            self.pending_grammars.add(request.request_id, grammar, admit)

    def abort_requests(self, request_ids: Iterable[str]) -> list[str]:
        """Finish them now and free their blocks; returns the ids that were still in the core."""
        request_ids = list(request_ids)
        removed = self.pending_grammars.abort(request_ids) + self.scheduler.abort_requests(request_ids)
        if removed and self.observers:
            now = time.monotonic()
            for observer in self.observers:
                observer.on_abort(removed, now)
        return removed

    def reset_prefix_cache(self) -> bool:
        """Forget every cached prefix block (vLLM's reset_prefix_cache): False while requests still hold
        blocks, as the cache then cannot be emptied."""
        return self.scheduler.reset_prefix_cache()

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished() or bool(self.pending_grammars)

    def running_request_ids(self) -> list[str]:
        return [r.request_id for r in self.scheduler.running]

    def step(self) -> EngineCoreOutputs:
        start = time.monotonic()
        failed = []
        if self.pending_grammars:
            if not self.scheduler.has_unfinished():  # idle but for compiling grammars: wait for one
                self.pending_grammars.wait(GRAMMAR_WAIT_S)
            failed = self.pending_grammars.release()
        sched = self.scheduler.schedule()
        if sched.empty:
            self.runner.forget(sched.finished_req_ids)
            return EngineCoreOutputs(failed, time.monotonic())
        for observer in self.observers:
            observer.on_schedule(sched, start)
        runner_output = self.runner.execute(sched)
        outputs = self.scheduler.update_from_output(sched, runner_output)
        outputs.outputs[:0] = failed
        if self.observers:
            end = time.monotonic()
            for observer in self.observers:
                observer.on_step(sched, outputs, start, end)
        if self.record_steps:
            self.step_records.append(StepRecord(
                start=start, duration=time.monotonic() - start, num_seqs=len(sched.scheduled),
                num_tokens=sched.num_tokens, num_prefill_seqs=sum(s.num_new_tokens > 1 for s in sched.scheduled),
                kv=self.kv.stats(), num_waiting=len(self.scheduler.waiting), num_preempted=len(sched.preempted)))
        return outputs

    def prompt_log_softmax(self, token_ids: list[int], first_target: int = 1) -> torch.Tensor:
        """ModelRunner.prompt_log_softmax on blocks of this core's pool, freed before it returns, in
        chunks of the scheduler's token budget (one pass without chunked prefill). For scoring text
        (`pagedserve perplexity`): it runs beside the scheduler, between steps, never during one."""
        if len(token_ids) > self.max_model_len:
            raise ValueError(f"{len(token_ids)} tokens exceed max_model_len ({self.max_model_len})")
        need = self.kv.blocks_needed(len(token_ids) - 1)  # the last token is never fed
        if need > self.kv.pool.num_free:
            raise ValueError(f"scoring {len(token_ids)} tokens needs {need} KV blocks, {self.kv.pool.num_free} "
                             "free (raise kv_cache_memory_gb or num_blocks)")
        sc = self.config.scheduler
        chunk = sc.max_num_batched_tokens if sc.enable_chunked_prefill else None
        blocks = self.kv.pool.allocate(need)
        try:
            return self.runner.prompt_log_softmax(token_ids, blocks, first_target, chunk)
        finally:
            self.kv.pool.free(blocks[::-1])

    def kv_stats(self) -> KVCacheStats:
        return self.kv.stats()

    def spec_decode_stats(self) -> SpecDecodeStats | None:
        """Speculative decoding's counters since the start (None when it is off)."""
        spec = self.runner.speculator
        return None if spec is None else spec.stats.copy()

    def enable_live_view(self) -> LiveView:
        """The live page's view of this core (its history and request traces observe every step from
        now on); made once."""
        if self.live_view is None:
            if self.tracer is None:
                self.tracer = RequestTracer()
                self.observers.append(self.tracer)
            self.live_view = LiveView(self, self.tracer)
            self.observers.append(self.live_view.history)
        return self.live_view

    def kv_snapshot(self) -> list[BlockInfo]:
        return self.kv.snapshot()
