"""Copy-on-write copies: whole KV blocks duplicated inside the cache, in every layer, before a step
writes into the private copies (n > 1 and beam search share a partly filled block until then)."""

from __future__ import annotations

import torch


def copy_blocks_along(kv_caches: list[tuple[torch.Tensor, torch.Tensor]], copies: list[tuple[int, int]],
                      block_dim: int) -> None:
    if not copies:
        return
    device = kv_caches[0][0].device
    src = torch.tensor([s for s, _ in copies], dtype=torch.long, device=device)
    dst = torch.tensor([d for _, d in copies], dtype=torch.long, device=device)
    for k_cache, v_cache in kv_caches:
        for cache in (k_cache, v_cache):
            cache.index_copy_(block_dim, dst, cache.index_select(block_dim, src))
