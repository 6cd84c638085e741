"""Attention metadata: what the runner knows about a step (backend-neutral), and the decode/prefill
split that both CPU-side backends build from it. Each backend builds its own metadata object; the
model passes it to the attention layers without looking inside."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class CommonAttentionMetadata:
    """The runner's flat inputs: requests in batch order, their query tokens contiguous in the batch."""

    slot_mapping: torch.Tensor  # [T] flat cache slot each new token's K/V goes to
    query_lens: list[int]  # new tokens per request this step
    seq_lens: list[int]  # tokens of each request in the cache after this step (its new ones included)
    block_tables: list[list[int]]  # per request: physical block ids (at least ceil(seq_len / block_size))
    block_size: int
    device: torch.device


@dataclass
class PrefillSegment:
    """A run of query tokens from one request (a prompt or a chunk of one)."""

    start: int  # offset in the flat token batch
    length: int  # query tokens in this step
    context_len: int  # tokens of the request in the cache after this step (includes these)
    block_table: torch.Tensor  # [num_blocks] physical block ids


@dataclass
class DecodePrefillMetadata:
    """Requests with one query token come first in the flat batch (one kernel call for all of them),
    then the others as prefill segments."""

    slot_mapping: torch.Tensor
    num_decode_tokens: int
    decode_block_tables: torch.Tensor | None  # [B, max_blocks] int64, padded with block 0
    decode_context_lens: torch.Tensor | None  # [B] int64, this step's token included
    prefills: list[PrefillSegment]


def decodes_first(query_lens: list[int]) -> list[int]:
    """Batch order for backends with a separate one-query kernel: those requests first, the rest after,
    each group in the scheduler's order."""
    ones = [i for i, n in enumerate(query_lens) if n == 1]
    return ones + [i for i, n in enumerate(query_lens) if n != 1]


def split_decode_prefill(common: CommonAttentionMetadata) -> DecodePrefillMetadata:
    """The common inputs (batch already in `decodes_first` order) as decode rows and prefill segments."""
    dev, bs = common.device, common.block_size
    nd = 0
    while nd < len(common.query_lens) and common.query_lens[nd] == 1:
        nd += 1
    tables = lens = None
    if nd:
        dec_lens = common.seq_lens[:nd]
        max_blocks = -(-max(dec_lens) // bs)
        padded = [t[:max_blocks] + [0] * (max_blocks - min(len(t), max_blocks)) for t in common.block_tables[:nd]]
        tables = torch.tensor(padded, dtype=torch.long, device=dev)
        lens = torch.tensor(dec_lens, dtype=torch.long, device=dev)
    segments = []
    start = nd
    for qlen, seq_len, table in zip(common.query_lens[nd:], common.seq_lens[nd:], common.block_tables[nd:],
                                    strict=True):
        segments.append(PrefillSegment(start, qlen, seq_len,
                                       torch.tensor(table[: -(-seq_len // bs)], dtype=torch.long, device=dev)))
        start += qlen
    return DecodePrefillMetadata(common.slot_mapping, nd, tables, lens, segments)
