"""LLMEngine: add_request / step / abort_request — one scheduler step, one forward, one sample.

Requests with n > 1 become n sequences (children) that are reported together as one RequestOutput.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import torch

from pagedserve.config import EngineConfig
from pagedserve.core.kv_cache_manager import KVCacheManager, KVCacheStats
from pagedserve.core.scheduler import Scheduler
from pagedserve.detokenizer import IncrementalDetokenizer
from pagedserve.model.layers.sampler import Sampler
from pagedserve.model.loader import (
    iter_quantized_rows,
    iter_weights,
    load_config,
    load_tokenizer,
    resolve_model_path,
)
from pagedserve.model.registry import model_class_for
from pagedserve.outputs import CompletionOutput, Logprob, RequestOutput
from pagedserve.request import Request, RequestStatus
from pagedserve.sampling_params import SamplingParams
from pagedserve.worker.model_runner import ModelRunner, kv_block_bytes

PromptType = str | list[int] | dict


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


@dataclass
class _Sequence:
    request: Request
    detok: IncrementalDetokenizer
    emitted_tokens: int = 0


@dataclass
class _Group:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    seqs: list[_Sequence] = field(default_factory=list)

    @property
    def finished(self) -> bool:
        return all(s.request.is_finished for s in self.seqs)


class LLMEngine:
    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        if config.num_threads:
            torch.set_num_threads(config.num_threads)
        torch.manual_seed(config.seed)
        self.device = torch.device(config.device)
        path = resolve_model_path(config.model)
        self.model_path = path
        self.model_config = cfg = load_config(path)
        model = model_class_for(cfg.architecture)(cfg)
        model.load_weights(iter_weights(path, cfg))
        if self.device.type == "cpu" and config.torch_dtype == torch.float32:  # the only path that reads them
            model.attach_quantized(iter_quantized_rows(path, cfg))
        self.model = model.to(device=self.device, dtype=config.torch_dtype).eval()
        self.model.rotary.float()  # cos/sin tables stay float32 for accuracy; cast per step
        self.model.prepare_for_inference()
        self.tokenizer = load_tokenizer(path)

        self.max_model_len = min(config.max_model_len or cfg.max_position_embeddings,
                                 cfg.max_position_embeddings)
        cc = config.cache
        block_bytes = kv_block_bytes(cfg, cc.block_size, config.torch_dtype)
        num_blocks = cc.num_blocks or max(1, int(cc.kv_cache_memory_gb * 2**30 // block_bytes))
        self.kv = KVCacheManager(num_blocks, cc.block_size)
        self.scheduler = Scheduler(config.scheduler, self.kv)
        self.runner = ModelRunner(self.model, cfg, num_blocks, cc.block_size, config.torch_dtype, self.device)
        self.sampler = Sampler(self.model.fused)
        self.eos_token_id = self._eos_id()
        self._groups: dict[str, _Group] = {}
        self._seq_to_group: dict[str, _Group] = {}
        self._pending_outputs: list[RequestOutput] = []
        self._ids = itertools.count()
        self.record_steps = False
        self.step_records: list[StepRecord] = []
        self.num_generated_tokens = 0
        self.num_prompt_tokens = 0

    def _eos_id(self) -> int | None:
        eos = self.tokenizer.eos_token_id
        if eos is None:
            eos = self.model_config.eos_token_id
        return eos[0] if isinstance(eos, list) else eos

    # --- capacity -----------------------------------------------------------------------------

    @property
    def capacity_tokens(self) -> int:
        return self.kv.pool.num_blocks * self.kv.block_size

    def kv_stats(self) -> KVCacheStats:
        return self.kv.stats()

    # --- requests -----------------------------------------------------------------------------

    def tokenize_prompt(self, prompt: PromptType) -> tuple[str | None, list[int]]:
        """A prompt string, a list of token ids, or {"prompt_token_ids": [...]} / {"prompt": "..."}."""
        if isinstance(prompt, dict):
            if "prompt_token_ids" in prompt:
                prompt = list(prompt["prompt_token_ids"])
            elif "prompt" in prompt:
                prompt = prompt["prompt"]
            else:
                raise ValueError("prompt dict must have 'prompt' or 'prompt_token_ids'")
        if isinstance(prompt, str):
            if not prompt:
                raise ValueError("prompt must be a non-empty string")
            return prompt, self.tokenizer.encode(prompt)
        if isinstance(prompt, (list, tuple)):
            vocab = self.model_config.vocab_size
            if not prompt:
                raise ValueError("prompt_token_ids must be a non-empty list")
            if not all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < vocab for t in prompt):
                raise ValueError(f"prompt_token_ids must be integers in [0, {vocab})")
            return None, list(prompt)
        raise ValueError(f"prompt must be a string, a list of token ids or a dict, got {type(prompt).__name__}")

    def add_request(self, request_id: str | None, prompt: PromptType, params: SamplingParams | None = None,
                    arrival_time: float | None = None) -> str:
        """Validate and queue a request. Raises ValueError (naming the field) before touching the engine."""
        params = params or SamplingParams()
        if not isinstance(params, SamplingParams):
            raise ValueError("sampling_params must be a SamplingParams")
        request_id = str(next(self._ids)) if request_id is None else request_id
        if request_id in self._groups:
            raise ValueError(f"request_id {request_id!r} is already in use")
        text, prompt_ids = self.tokenize_prompt(prompt)
        limit = min(self.max_model_len, self.capacity_tokens)
        if len(prompt_ids) >= limit:
            raise ValueError(f"prompt has {len(prompt_ids)} tokens; the limit is {limit - 1} "
                             f"(max_model_len={self.max_model_len}, KV capacity={self.capacity_tokens} tokens)")
        if params.max_tokens is None:  # as much as fits
            params = replace(params, max_tokens=limit - len(prompt_ids))
        total = len(prompt_ids) + params.max_tokens
        if total > self.max_model_len:
            raise ValueError(f"max_tokens={params.max_tokens} plus the prompt's {len(prompt_ids)} tokens exceeds "
                             f"max_model_len={self.max_model_len}")
        if total > self.capacity_tokens:
            raise ValueError(f"max_tokens={params.max_tokens} plus the prompt's {len(prompt_ids)} tokens exceeds "
                             f"the KV cache capacity of {self.capacity_tokens} tokens")

        group = _Group(request_id, text, prompt_ids, params)
        arrival = time.monotonic() if arrival_time is None else arrival_time
        for i in range(params.n):
            seq_id = request_id if params.n == 1 else f"{request_id}#{i}"
            seed = None if params.seed is None else params.seed + i
            req = Request(seq_id, text, prompt_ids, params, self.eos_token_id, arrival, seed)
            detok = IncrementalDetokenizer(self.tokenizer, prompt_ids, params.stop,
                                           params.include_stop_str_in_output, params.skip_special_tokens)
            group.seqs.append(_Sequence(req, detok))
            self._seq_to_group[seq_id] = group
        self._groups[request_id] = group
        for s in group.seqs:
            self.scheduler.add_request(s.request)
        self.num_prompt_tokens += len(prompt_ids)
        return request_id

    def abort_request(self, request_id: str | Sequence[str]) -> None:
        ids = [request_id] if isinstance(request_id, str) else list(request_id)
        now = time.monotonic()
        for rid in ids:
            group = self._groups.get(rid)
            if group is None:
                continue
            for s in group.seqs:
                if not s.request.is_finished:
                    self.scheduler.finish_request(s.request, RequestStatus.FINISHED_ABORTED)
                    s.request.metrics.finished_time = now
            self._pending_outputs.append(self._make_output(group))
            self._forget(group)

    def has_unfinished_requests(self) -> bool:
        return bool(self._groups) or bool(self._pending_outputs)

    def get_num_unfinished_requests(self) -> int:
        return len(self._groups)

    def running_request_ids(self) -> list[str]:
        """Ids of the requests with a sequence in the running batch (what a failed step was working on)."""
        groups = (self._seq_to_group.get(r.request_id) for r in self.scheduler.running)
        return sorted({g.request_id for g in groups if g is not None})

    # --- the step -----------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        start = time.monotonic()
        sched = self.scheduler.schedule()
        outputs, self._pending_outputs = self._pending_outputs, []
        if sched.empty:
            return outputs
        try:
            logits, sampled = self.runner.execute(sched)
        except Exception:
            self._pending_outputs = outputs + self._pending_outputs  # keep abort outputs for the next step
            raise
        for s in sched.scheduled:
            s.request.num_computed_tokens += s.num_new_tokens
        touched: dict[str, _Group] = {}
        if sampled:
            result = self.sampler(logits, [s.request for s in sampled])
            now = time.monotonic()
            for s, token, logprob in zip(sampled, result.token_ids, result.logprobs, strict=True):
                group = self._seq_to_group[s.request.request_id]
                self._append_token(group, s.request, token, logprob, now)
                touched[group.request_id] = group
        for group in touched.values():
            outputs.append(self._make_output(group))
            if group.finished:
                self._forget(group)
        if self.record_steps:
            self.step_records.append(StepRecord(
                start=start, duration=time.monotonic() - start, num_seqs=len(sched.scheduled),
                num_tokens=sched.num_tokens, num_prefill_seqs=sum(s.num_new_tokens > 1 for s in sched.scheduled),
                kv=self.kv.stats(), num_waiting=len(self.scheduler.waiting), num_preempted=len(sched.preempted)))
        return outputs

    def _append_token(self, group: _Group, req: Request, token: int,
                      logprob: tuple[float, list[tuple[int, float]]] | None, now: float) -> None:
        seq = next(s for s in group.seqs if s.request is req)
        req.output_token_ids.append(token)
        self.num_generated_tokens += 1
        m = req.metrics
        if m.first_token_time is None:
            m.first_token_time = now
        m.token_times.append(now)
        if logprob is not None:
            req.logprobs.append(self._logprob_dict(token, logprob))
        status = self._check_stop(req, seq.detok, token)
        if status is not None:
            m.finished_time = now
            self.scheduler.finish_request(req, status)

    def _check_stop(self, req: Request, detok: IncrementalDetokenizer, token: int) -> RequestStatus | None:
        p = req.params
        n_out = len(req.output_token_ids)
        may_stop = n_out > p.min_tokens  # the sampler masked EOS/stop ids for the first min_tokens
        if may_stop and not p.ignore_eos and token == self.eos_token_id:
            return RequestStatus.FINISHED_STOPPED
        if may_stop and token in p.stop_token_ids:
            req.stop_reason = token
            return RequestStatus.FINISHED_STOPPED
        stop_str = detok.add_token(token, check_stop=may_stop)
        if stop_str is not None:
            req.stop_reason = stop_str
            return RequestStatus.FINISHED_STOPPED
        if n_out >= p.max_tokens or req.num_tokens >= self.max_model_len:
            return RequestStatus.FINISHED_LENGTH
        return None

    def _logprob_dict(self, token: int, logprob: tuple[float, list[tuple[int, float]]]) -> dict[int, Logprob]:
        chosen, top = logprob
        out = {tid: Logprob(lp, rank + 1, self.tokenizer.decode([tid])) for rank, (tid, lp) in enumerate(top)}
        if token not in out:
            out[token] = Logprob(chosen, None, self.tokenizer.decode([token]))
        return out

    def _make_output(self, group: _Group) -> RequestOutput:
        completions = []
        for i, seq in enumerate(group.seqs):
            req = seq.request
            finished = req.is_finished
            completions.append(CompletionOutput(
                index=i, text=seq.detok.text, token_ids=list(req.output_token_ids),
                logprobs=list(req.logprobs) if req.params.logprobs is not None else None,
                finish_reason=req.status.value if finished else None, stop_reason=req.stop_reason,
                text_delta=seq.detok.release(finished),
                token_ids_delta=req.output_token_ids[seq.emitted_tokens:]))
            seq.emitted_tokens = len(req.output_token_ids)
        first = group.seqs[0].request.metrics
        return RequestOutput(group.request_id, group.prompt, group.prompt_token_ids, completions,
                             finished=group.finished, metrics=first)

    def _forget(self, group: _Group) -> None:
        self._groups.pop(group.request_id, None)
        for s in group.seqs:
            self._seq_to_group.pop(s.request.request_id, None)
