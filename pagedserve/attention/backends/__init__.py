"""Attention backends. Each owns its KV cache layout, its batch order and its per-step metadata:

    allocate_kv_cache(num_blocks, block_size, kv_heads, head_dim, dtype, device) -> (k_cache, v_cache)
        (dtype is the cache's own, kv_cache_dtype, which may differ from the model's)
    reorder_batch(query_lens) -> the order of the step's requests in the flat batch
    build_metadata(CommonAttentionMetadata) -> whatever its __call__ reads
    __call__(q, k, v, k_cache, v_cache, metadata, scale) -> attention output
    copy_blocks(kv_caches, [(src, dst)]) -> copy whole blocks (copy on write)

`select_attention_backend` picks one for a device and dtype: cpu_fused.py, triton_paged.py (CUDA) or
torch_ref.py.
"""

from __future__ import annotations

import os
from types import ModuleType

import torch

from pagedserve.attention.backends.cpu_fused import CpuPagedAttention
from pagedserve.attention.backends.torch_ref import TorchPagedAttention

AttentionBackend = TorchPagedAttention | CpuPagedAttention


def select_attention_backend(device: torch.device, dtype: torch.dtype, ops: ModuleType | None) -> AttentionBackend:
    """The fused CPU kernels for float32 on CPU when they built; the Triton kernels on CUDA (Triton ships
    with CUDA builds of torch); the plain-PyTorch reference otherwise, or whenever
    $PAGEDSERVE_ATTENTION_BACKEND=torch (for A/B runs)."""
    if os.environ.get("PAGEDSERVE_ATTENTION_BACKEND") == "torch":
        return TorchPagedAttention()
    if ops is not None and device.type == "cpu" and dtype == torch.float32:
        return CpuPagedAttention(ops)
    if device.type == "cuda":
        try:
            from pagedserve.attention.backends.triton_paged import TritonPagedAttention
        except ImportError:  # a CUDA torch without Triton: the reference still works
            return TorchPagedAttention()
        return TritonPagedAttention()
    return TorchPagedAttention()


__all__ = ["AttentionBackend", "CpuPagedAttention", "TorchPagedAttention", "select_attention_backend"]
