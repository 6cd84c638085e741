"""The KV cache layout the PyTorch reference and the Triton backend share, per layer
[kv_heads, num_blocks, block_size, head_dim], with their batch order (one-query requests first)."""

from __future__ import annotations

import torch

from pagedserve.attention.backends.block_copy import copy_blocks_along
from pagedserve.attention.metadata import decodes_first


class HeadMajorCache:
    def __init__(self) -> None:
        self._cache_shape: tuple[int, ...] | None = None

    def reorder_batch(self, query_lens: list[int]) -> list[int]:
        return decodes_first(query_lens)

    def allocate_kv_cache(self, num_blocks: int, block_size: int, kv_heads: int, head_dim: int,
                          dtype: torch.dtype, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        shape = (kv_heads, num_blocks, block_size, head_dim)
        self._cache_shape = shape
        return torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device)

    def copy_blocks(self, kv_caches: list[tuple[torch.Tensor, torch.Tensor]], copies: list[tuple[int, int]]) -> None:
        copy_blocks_along(kv_caches, copies, block_dim=1)  # blocks are dim 1 of both caches
