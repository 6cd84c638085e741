"""What every attention layer needs to know about one engine step, built once per step."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class PrefillSegment:
    """A run of query tokens from one request (a prompt or a chunk of one)."""

    start: int  # offset in the flat token batch
    length: int  # query tokens in this step
    context_len: int  # tokens of the request in the cache after this step (includes these)
    block_table: torch.Tensor  # [num_blocks] physical block ids


@dataclass
class AttentionMetadata:
    """Decode tokens (one query each) come first in the flat batch, then prefill segments."""

    slot_mapping: torch.Tensor  # [T] flat cache slot each new token's K/V goes to
    num_decode_tokens: int
    decode_block_tables: torch.Tensor | None  # [B, max_blocks] int64, padded with block 0
    decode_context_lens: torch.Tensor | None  # [B] int64, this step's token included
    prefills: list[PrefillSegment]
    # Filled by the plain-PyTorch backend's prepare_step (the fused kernels read the tables directly):
    # [kv_heads * B * max_blocks]: row (head, block) of the cache viewed as [kv_heads * num_blocks, ...]
    decode_gather_index: torch.Tensor | None = None
    decode_mask: torch.Tensor | None = None  # [1, B, 1, max_blocks * block_size]; True = padding, masked out
    # Filled by the fused CPU backend's prepare_step when the step has prefill segments:
    prefill_info: torch.Tensor | None = None  # [S, 3] int64: (start, length, context_len) per segment
    prefill_tables: torch.Tensor | None = None  # [S, max_blocks] int64, padded with block 0
