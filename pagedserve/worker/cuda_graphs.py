"""CUDA graphs for decode steps.

A decode step of a small model on a GPU is hundreds of short kernels, and launching them from Python
costs far more than running them. `DecodeGraphs` captures the model's forward once per batch-size
bucket (1, 2, 4, 8, then every 8 up to 256, then every 16) at engine start, over persistent input
buffers (token ids, positions, slot mapping, block tables, context lengths); a decode step copies its
inputs into the first rows of those buffers and replays the smallest bucket that holds its batch.
Rows past the batch are padding: slot -1 (the KV write skips them) and context 0 (attention gives
zeros), so they touch no block.

Steps with a prefill, batches larger than the largest bucket and steps that verify speculative drafts
run eagerly; so does everything with `enforce_eager=True`.

The capture itself is behind `GraphCapture` so that the bucket selection and the buffer reuse are
tested without a GPU: `EagerReplay` "captures" by keeping the callable and "replays" by running it
again into the same output tensor, reading the same buffers a real graph would read.
"""

from __future__ import annotations

import bisect
import logging
import time
from collections.abc import Callable
from typing import Any, Protocol

import torch

log = logging.getLogger(__name__)

Replay = Callable[[], torch.Tensor]


def capture_sizes(max_num_seqs: int) -> list[int]:
    """Batch-size buckets up to max_num_seqs (which is always one): 1, 2, 4, 8, every 8 to 256, then every 16."""
    sizes = {1, 2, 4, *range(8, 257, 8), *range(272, max_num_seqs + 1, 16), max_num_seqs}
    return sorted(s for s in sizes if s <= max_num_seqs)


def bucket_for(batch: int, sizes: list[int]) -> int | None:
    """The smallest bucket holding `batch` rows, or None when the batch is larger than every bucket."""
    i = bisect.bisect_left(sizes, batch)
    return sizes[i] if i < len(sizes) else None


class GraphCapture(Protocol):
    def capture(self, fn: Callable[[], torch.Tensor]) -> Replay: ...


class CudaGraphCapture:
    """torch.cuda.CUDAGraph, every graph in one memory pool (buckets replay one at a time)."""

    def __init__(self) -> None:
        self.pool = torch.cuda.graph_pool_handle()

    def capture(self, fn: Callable[[], torch.Tensor]) -> Replay:
        fn()  # warm-up outside the capture: Triton compiles here, the allocator settles
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            out = fn()

        def replay() -> torch.Tensor:
            graph.replay()
            return out
        return replay


class EagerReplay:
    """A stand-in for CUDA graphs (tests, and devices without them): the callable runs again at each
    replay and writes into the output tensor of the first run, as a replayed graph does."""

    def capture(self, fn: Callable[[], torch.Tensor]) -> Replay:
        out = fn()

        @torch.inference_mode()
        def replay() -> torch.Tensor:
            out.copy_(fn())
            return out
        return replay


class DecodeGraphs:
    """The model's decode forward, captured per bucket over persistent buffers."""

    def __init__(self, model: Any, kv_caches: list, max_num_seqs: int, max_model_len: int, block_size: int,
                 device: torch.device, capture: GraphCapture) -> None:
        self.model = model
        self.kv_caches = kv_caches
        self.backend = model.attention_backend
        self.sizes = capture_sizes(max_num_seqs)
        self.max_model_len = max_model_len
        self.block_size = block_size
        self.device = device
        self._capture = capture
        rows, width = self.sizes[-1], -(-max_model_len // block_size)
        self.input_ids = torch.zeros(rows, dtype=torch.long, device=device)
        self.positions = torch.zeros(rows, dtype=torch.long, device=device)
        self.slot_mapping = torch.full((rows,), -1, dtype=torch.long, device=device)
        self.block_tables = torch.zeros((rows, width), dtype=torch.int32, device=device)
        self.context_lens = torch.zeros(rows, dtype=torch.int32, device=device)
        self._replays: dict[int, Replay] = {}
        self.capture_seconds = 0.0
        self.capture_bytes = 0
        self.replays = 0  # decode steps served by a graph, for stats and tests

    def capture_all(self) -> None:
        """One graph per bucket, largest first (the smaller ones then reuse its pool's memory)."""
        started = time.perf_counter()
        cuda = self.device.type == "cuda"
        before = torch.cuda.memory_allocated(self.device) if cuda else 0
        for size in reversed(self.sizes):
            self._replays[size] = self._capture.capture(self._forward_fn(size))
        if cuda:
            torch.cuda.synchronize(self.device)
            self.capture_bytes = torch.cuda.memory_allocated(self.device) - before
        self.capture_seconds = time.perf_counter() - started
        log.info("captured %d decode CUDA graphs (batch sizes %d..%d) in %.2f s, %.1f MiB", len(self.sizes),
                 self.sizes[0], self.sizes[-1], self.capture_seconds, self.capture_bytes / 2**20)

    def _forward_fn(self, size: int) -> Callable[[], torch.Tensor]:
        meta = self.backend.decode_graph_metadata(self.slot_mapping[:size], self.block_tables[:size],
                                                  self.context_lens[:size], self.max_model_len)
        ids, positions, caches = self.input_ids[:size], self.positions[:size], self.kv_caches

        @torch.inference_mode()
        def forward() -> torch.Tensor:
            return self.model(ids, positions, caches, meta)
        return forward

    def covers(self, query_lens: list[int]) -> bool:
        """A step a graph can run: only decode rows (one new token each), no more than the largest bucket."""
        return 0 < len(query_lens) <= self.sizes[-1] and all(n == 1 for n in query_lens)

    @torch.inference_mode()
    def run(self, input_ids: list[int], positions: list[int], slots: list[int], seq_lens: list[int],
            block_tables: list[list[int]]) -> torch.Tensor:
        """Hidden states [batch, hidden] of one decode step (a view into the graph's output: read it
        before the next replay)."""
        batch = len(input_ids)
        size = bucket_for(batch, self.sizes)
        assert size is not None and size in self._replays, f"no captured graph for a batch of {batch}"
        pad = size - batch
        width = max(-(-n // self.block_size) for n in seq_lens)
        tables = torch.tensor([t[:width] + [0] * (width - min(len(t), width)) for t in block_tables],
                              dtype=torch.int32)
        # padding rows: token 0 at position 0, no slot, empty context (see the module docstring)
        self.input_ids[:size].copy_(torch.tensor(input_ids + [0] * pad), non_blocking=True)
        self.positions[:size].copy_(torch.tensor(positions + [0] * pad), non_blocking=True)
        self.slot_mapping[:size].copy_(torch.tensor(slots + [-1] * pad), non_blocking=True)
        self.context_lens[:size].copy_(torch.tensor(seq_lens + [0] * pad, dtype=torch.int32), non_blocking=True)
        self.block_tables[:batch, :width].copy_(tables, non_blocking=True)
        self.replays += 1
        return self._replays[size]()[:batch]


def build_decode_graphs(model: Any, kv_caches: list, max_num_seqs: int, max_model_len: int, block_size: int,
                        device: torch.device, enforce_eager: bool) -> DecodeGraphs | None:
    """Captured decode graphs on CUDA with a backend that supports them, unless enforce_eager."""
    if enforce_eager or device.type != "cuda" or not getattr(model.attention_backend, "supports_decode_graphs", False):
        return None
    graphs = DecodeGraphs(model, kv_caches, max_num_seqs, max_model_len, block_size, device, CudaGraphCapture())
    graphs.capture_all()
    return graphs
