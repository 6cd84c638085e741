"""A flat batch (no padding) from runs of tokens, one run per request, for a forward outside the
scheduler's step (a draft model's passes): token ids, positions, the attention backend's metadata and
the row of each run's last token."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pagedserve.attention.metadata import CommonAttentionMetadata


@dataclass
class TokenRun:
    token_ids: list[int]
    start: int  # position of the first token
    block_ids: list[int]  # the request's block table (covering start + len(token_ids) slots)


@dataclass
class FlatBatch:
    input_ids: torch.Tensor
    positions: torch.Tensor
    meta: object
    last_rows: list[int]  # per run, in the order given: the flat row of its last token


def build_flat_batch(backend, block_size: int, device: torch.device, runs: list[TokenRun]) -> FlatBatch:
    order = backend.reorder_batch([len(r.token_ids) for r in runs])
    ids: list[int] = []
    positions: list[int] = []
    slots: list[int] = []
    last = [0] * len(runs)
    for i in order:
        run = runs[i]
        end = run.start + len(run.token_ids)
        ids.extend(run.token_ids)
        positions.extend(range(run.start, end))
        table = run.block_ids
        slots.extend(table[p // block_size] * block_size + p % block_size for p in range(run.start, end))
        last[i] = len(ids) - 1
    batch = [runs[i] for i in order]
    common = CommonAttentionMetadata(torch.tensor(slots, dtype=torch.long, device=device),
                                     [len(r.token_ids) for r in batch], [r.start + len(r.token_ids) for r in batch],
                                     [r.block_ids for r in batch], block_size, device)
    return FlatBatch(torch.tensor(ids, dtype=torch.long, device=device),
                     torch.tensor(positions, dtype=torch.long, device=device), backend.build_metadata(common), last)
