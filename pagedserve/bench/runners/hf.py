"""Baseline: Hugging Face transformers `generate` in static batches (the classic way to batch).

When idle, the runner takes up to `batch_size` requests that have arrived, left-pads them to one
width and generates max(max_tokens) tokens for every row; nobody joins until `generate` returns. A
streamer timestamps every decoding step, so each request gets TTFT (its batch's first token), its own
token times up to its max_tokens, and its finish (its last requested token). Tokens a row generates
past its own max_tokens are computed but not counted. KV statistics: the dense cache holds
batch × (padded prompt + generated) slots, of which only live rows' real tokens are useful.
"""

from __future__ import annotations

import gc
import time
from collections.abc import Callable

import torch
from tqdm import tqdm
from transformers.generation.streamers import BaseStreamer

from pagedserve.bench.contention import Contention, note_if_disturbed
from pagedserve.bench.records import RequestRecord, RunResult, StepSample
from pagedserve.bench.runners.replay import ArrivalReplay
from pagedserve.bench.workloads import Workload, WorkloadRequest
from pagedserve.model.loader import load_tokenizer, resolve_model_path


class StepClock(BaseStreamer):
    """Records when each decoding step's tokens come out (generate calls put() once with the prompt first)."""

    def __init__(self, clock: Callable[[], float], on_step: Callable[[int], None] | None = None) -> None:
        self.clock = clock
        self.on_step = on_step
        self.times: list[float] = []
        self._seen_prompt = False

    def put(self, value) -> None:
        if not self._seen_prompt:
            self._seen_prompt = True
            return
        self.times.append(self.clock())
        if self.on_step is not None:
            self.on_step(len(self.times))

    def end(self) -> None:
        pass


def load_hf_model(model: str, dtype: torch.dtype = torch.float32):
    """transformers' own model from the same weights the engine loads (GGUF or HF folder)."""
    from transformers import AutoModelForCausalLM

    path = resolve_model_path(model)
    if path.suffix == ".gguf":
        hf = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=dtype)
    else:
        hf = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype)
    return hf.eval(), load_tokenizer(path)


class HFStaticBatcher:
    def __init__(self, model, tokenizer, batch_size: int = 16, block_size: int = 16) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.model = model
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.block_size = block_size  # only to express KV slots in the engine's block units
        pad = tokenizer.pad_token_id
        self.pad_id = pad if pad is not None else (tokenizer.eos_token_id or 0)
        self.max_positions = getattr(model.config, "max_position_embeddings", None)

    def generate_batch(self, prompts: list[list[int]], new_tokens: int, clock: Callable[[], float],
                       on_step: Callable[[int], None] | None = None) -> list[float]:
        """Generate `new_tokens` for every row; return the time each decoding step's tokens came out."""
        width = max(len(p) for p in prompts)
        input_ids = torch.tensor([[self.pad_id] * (width - len(p)) + p for p in prompts])  # left padding
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
        streamer = StepClock(clock, on_step)
        with torch.no_grad():
            self.model.generate(input_ids, attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                do_sample=False, pad_token_id=self.pad_id, streamer=streamer)
        return streamer.times

    def warm_up(self) -> None:
        ids = self.tokenizer.encode("Warm-up: the quick brown fox jumps over the lazy dog.")
        self.generate_batch([ids, ids[:5]], 3, time.monotonic)

    def run(self, workload: Workload, system: str, progress: bool = True) -> RunResult:
        if any(r.temperature > 0 for r in workload.requests):
            raise ValueError("the HF baseline decodes greedily; the workload has temperature > 0")
        replay = ArrivalReplay(workload)
        records: dict[str, RequestRecord] = {}
        steps: list[StepSample] = []
        queue: list[tuple[WorkloadRequest, RequestRecord, list[int]]] = []
        bar = tqdm(total=len(workload.requests), desc=system, unit="req", disable=not progress, dynamic_ncols=True)
        started_unix = time.time()
        contention = Contention()
        replay.start()
        while not replay.exhausted or queue:
            for wr, arrival in replay.due(len(queue)):
                rec = records[wr.request_id] = RequestRecord(wr.request_id, arrival, wr.max_tokens, wr.template)
                ids = self.tokenizer.encode(wr.prompt)
                rec.prompt_tokens = len(ids)
                if self.max_positions and len(ids) + wr.max_tokens > self.max_positions:
                    rec.error = f"refused: {len(ids)} prompt + {wr.max_tokens} new tokens > {self.max_positions}"
                    bar.update(1)
                    continue
                queue.append((wr, rec, ids))
            if not queue:
                replay.wait_for_next()
                continue
            batch, queue = queue[:self.batch_size], queue[self.batch_size:]
            longest = max(wr.max_tokens for wr, _, _ in batch)

            def show(k: int, b: int = len(batch), q: int = len(queue), n: int = longest) -> None:
                if k % 8 == 0 or k == n:
                    bar.set_postfix_str(f"batch={b} token {k}/{n} queued={q}")

            self._run_batch(batch, replay, steps, show if progress else None)
            bar.update(len(batch))
        duration = replay.now()
        bar.close()
        # Requests that had arrived but were not yet in a batch, at each step (known exactly afterwards).
        waits = [(r.arrival, r.scheduled) for r in records.values() if r.scheduled is not None]
        for s in steps:
            s.num_waiting = sum(a <= s.t < sched for a, sched in waits)
        machine = contention.result()
        config = {"model": str(getattr(self.model, "name_or_path", "")), "batch_size": self.batch_size,
                  "padding": "left", "dtype": str(next(self.model.parameters()).dtype),
                  "torch_threads": torch.get_num_threads(), "contention": machine}
        note = note_if_disturbed(machine)
        return RunResult(system=system, kind="hf", config=config,
                         requests=[records[r.request_id] for r in workload.requests if r.request_id in records],
                         steps=steps, duration=duration, started_unix=started_unix, notes=[note] if note else [])

    def _run_batch(self, batch, replay: ArrivalReplay, steps: list[StepSample],
                   on_step: Callable[[int], None] | None = None) -> None:
        prompts = [ids for _, _, ids in batch]
        wants = [wr.max_tokens for wr, _, _ in batch]
        new_tokens = max(wants)
        start = replay.now()
        times = self.generate_batch(prompts, new_tokens, replay.now, on_step)
        for (_, rec, _), want in zip(batch, wants, strict=True):
            rec.scheduled = start
            rec.token_times = times[:want]
            rec.output_tokens = len(rec.token_times)
            rec.first_token = times[0] if times else None
            rec.finish = times[want - 1] if len(times) >= want else None
            if rec.finish is None:
                rec.error = f"generate returned {len(times)} steps, wanted {want}"
        width, b = max(len(p) for p in prompts), len(batch)
        prev = start
        for k, t in enumerate(times, 1):  # step k computed token k; its forward saw width + k - 1 positions
            held = width + k - 1
            live = [len(p) + k - 1 for p, want in zip(prompts, wants, strict=True) if k <= want]
            steps.append(StepSample(t=prev, duration=t - prev, batch_size=b,
                                    num_tokens=b * width if k == 1 else b, num_prefill=b if k == 1 else 0,
                                    kv_allocated_slots=b * held, kv_filled_slots=sum(live), kv_capacity_slots=None,
                                    block_size=self.block_size))
            prev = t


def run_hf(workload: Workload, model: str, batch_size: int = 16, block_size: int = 16, progress: bool = True,
           system: str | None = None) -> RunResult:
    hf_model, tokenizer = load_hf_model(model)
    try:
        batcher = HFStaticBatcher(hf_model, tokenizer, batch_size, block_size)
        batcher.warm_up()
        return batcher.run(workload, system or f"hf-generate-static{batch_size}", progress)
    finally:
        del hf_model
        gc.collect()
