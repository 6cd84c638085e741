"""This engine, in-process, under one batching policy: requests are added as their arrivals come due
and the engine is stepped in between; per-request timestamps and per-step batch/KV statistics come
from the engine's own RequestMetrics and StepRecords.
"""

from __future__ import annotations

import dataclasses
import gc
import time

import torch
from tqdm import tqdm

from pagedserve.bench.contention import Contention, note_if_disturbed
from pagedserve.bench.records import RequestRecord, RunResult, StepSample
from pagedserve.bench.runners.replay import ArrivalReplay
from pagedserve.bench.workloads import Workload, WorkloadRequest
from pagedserve.config import EngineConfig
from pagedserve.engine.llm_engine import LLMEngine
from pagedserve.sampling_params import SamplingParams

# Steps in a row with neither output nor a scheduled batch before we call the engine stuck.
_MAX_IDLE_STEPS = 10_000


def sampling_params(r: WorkloadRequest) -> SamplingParams:
    return SamplingParams(temperature=r.temperature, top_p=r.top_p, max_tokens=r.max_tokens,
                          ignore_eos=r.ignore_eos, seed=r.seed)


def build_engine(model: str, policy: str, engine_options: dict) -> LLMEngine:
    return LLMEngine(EngineConfig.from_kwargs(model, policy=policy, **engine_options))


def warm_up(engine: LLMEngine) -> None:
    """One short prefill + decode so first-call overheads don't land on the first measured request."""
    params = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
    for i in range(2):
        engine.add_request(f"__warmup{i}", "Warm-up: the quick brown fox jumps over the lazy dog. " * (i + 1), params)
    while engine.has_unfinished_requests():
        engine.step()


def step_sample(rec, t0: float) -> StepSample:
    """One engine StepRecord as the bench records it, its time counted from t0."""
    kv = rec.kv
    return StepSample(t=rec.start - t0, duration=rec.duration, batch_size=rec.num_seqs, num_tokens=rec.num_tokens,
                      num_prefill=rec.num_prefill_seqs, kv_allocated_slots=kv.used_blocks * kv.block_size,
                      kv_filled_slots=kv.used_slots, kv_capacity_slots=kv.total_blocks * kv.block_size,
                      block_size=kv.block_size, num_waiting=rec.num_waiting, num_preempted=rec.num_preempted,
                      kv_cached_blocks=getattr(kv, "cached_blocks", 0))


def prefix_counters(kv) -> tuple[int, int]:
    """(queries, hits) so far, in prompt tokens; (0, 0) from an engine without a prefix cache's counters."""
    return int(getattr(kv, "prefix_cache_queries", 0) or 0), int(getattr(kv, "prefix_cache_hits", 0) or 0)


def _finish_record(rec: RequestRecord, out, t0: float) -> None:
    m = out.metrics
    rec.prompt_tokens = len(out.prompt_token_ids)
    rec.output_tokens = len(out.outputs[0].token_ids)
    rec.scheduled = None if m.first_scheduled_time is None else m.first_scheduled_time - t0
    rec.first_token = None if m.first_token_time is None else m.first_token_time - t0
    rec.token_times = [t - t0 for t in m.token_times]
    rec.finish = None if m.finished_time is None else m.finished_time - t0
    if out.outputs[0].finish_reason == "abort":
        rec.error = "aborted"


def run_on_engine(engine: LLMEngine, workload: Workload, system: str, progress: bool = True) -> RunResult:
    """Replay `workload` on an already built (and warmed-up) engine."""
    engine.record_steps = True
    engine.step_records.clear()
    replay = ArrivalReplay(workload)
    records: dict[str, RequestRecord] = {}
    in_flight = 0
    idle = 0
    bar = tqdm(total=len(workload.requests), desc=system, unit="req", disable=not progress, dynamic_ncols=True)
    started_unix = time.time()
    contention = Contention()
    queries0, hits0 = prefix_counters(engine.kv_stats())  # the warm-up's lookups are not the run's
    spec0 = engine.stats().spec_decode
    spec0 = spec0.copy() if spec0 is not None else None
    t0 = replay.start()
    while not replay.exhausted or in_flight:
        for wr, arrival in replay.due(in_flight):
            rec = records[wr.request_id] = RequestRecord(wr.request_id, arrival, wr.max_tokens, wr.template)
            try:
                engine.add_request(wr.request_id, wr.prompt, sampling_params(wr), arrival_time=t0 + arrival)
                in_flight += 1
            except ValueError as e:  # e.g. longer than the model's context: the engine refuses it up front
                rec.error = f"refused: {e}"
                bar.update(1)
        if not in_flight:
            replay.wait_for_next()
            continue
        n_steps = len(engine.step_records)
        outputs = engine.step()
        idle = 0 if outputs or len(engine.step_records) > n_steps else idle + 1
        if idle > _MAX_IDLE_STEPS:
            raise RuntimeError(f"{system}: engine made no progress with {in_flight} requests in flight")
        for out in outputs:
            if out.request_id not in records:
                continue
            # Kept from whichever output carries it (the engine may set it on the first one only).
            if (cached := getattr(out, "num_cached_tokens", None)) is not None:
                records[out.request_id].cached_tokens = cached
            if out.finished:
                _finish_record(records[out.request_id], out, t0)
                in_flight -= 1
                bar.update(1)
        if progress and engine.step_records:
            last = engine.step_records[-1]
            bar.set_postfix_str(f"batch={last.num_seqs} waiting={last.num_waiting} "
                                f"kv={last.kv.utilization:.0%}", refresh=False)
    duration = replay.now()
    bar.close()
    queries1, hits1 = prefix_counters(engine.kv_stats())
    spec1 = engine.stats().spec_decode
    machine = contention.result()
    config = {"model": str(engine.model_path), "engine": dataclasses.asdict(engine.config),
              "num_kv_blocks": engine.kv_stats().total_blocks, "torch_threads": torch.get_num_threads(),
              "contention": machine}
    note = note_if_disturbed(machine)
    return RunResult(system=system, kind="engine", config=config,
                     requests=[records[r.request_id] for r in workload.requests if r.request_id in records],
                     steps=[step_sample(s, t0) for s in engine.step_records], duration=duration,
                     started_unix=started_unix, notes=[note] if note else [],
                     prefix_cache={"queries": queries1 - queries0, "hits": hits1 - hits0, "source": "engine counters"},
                     spec_decode=None if spec1 is None or spec0 is None else spec1.since(spec0).as_dict())


def run_engine(workload: Workload, model: str, policy: str, engine_options: dict | None = None,
               progress: bool = True, system: str | None = None) -> RunResult:
    """Build an engine for `policy`, warm it up, replay the workload, and free the engine again.

    Each policy gets a fresh engine (same options), so no state — e.g. a prefix cache — carries over.
    """
    engine = build_engine(model, policy, dict(engine_options or {}))
    try:
        warm_up(engine)
        return run_on_engine(engine, workload, system or f"pagedserve-{policy}", progress)
    finally:
        del engine
        gc.collect()  # the next system's KV cache should not have to share memory with this one
