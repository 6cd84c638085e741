"""Rotary position embeddings (HF "rotate half" layout), with Llama-3 frequency scaling."""

from __future__ import annotations

import math
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import torch
from torch import nn


def _llama3_inv_freq(inv_freq: torch.Tensor, scaling: dict[str, Any]) -> torch.Tensor:
    factor = scaling["factor"]
    low = scaling.get("low_freq_factor", 1.0)
    high = scaling.get("high_freq_factor", 4.0)
    old_len = scaling.get("original_max_position_embeddings", 8192)
    low_wavelen, high_wavelen = old_len / low, old_len / high
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(medium, smoothed, scaled)


class RotaryEmbedding(nn.Module):
    def __init__(self, head_dim: int, max_positions: int, theta: float,
                 scaling: dict[str, Any] | None = None) -> None:
        super().__init__()
        inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
        rope_type = (scaling or {}).get("rope_type", (scaling or {}).get("type", "default"))
        if rope_type == "llama3":
            inv_freq = _llama3_inv_freq(inv_freq, scaling)
        elif rope_type == "linear":
            inv_freq = inv_freq / scaling["factor"]
        elif rope_type not in ("default", None):
            raise ValueError(f"rope scaling type {rope_type!r} is not supported (default, linear, llama3)")
        freqs = torch.outer(torch.arange(max_positions, dtype=torch.float32), inv_freq)
        emb = torch.cat((freqs, freqs), dim=-1)
        self.register_buffer("cos_cached", emb.cos(), persistent=False)
        self.register_buffer("sin_cached", emb.sin(), persistent=False)

    def prepare(self, positions: torch.Tensor, dtype: torch.dtype, fused: ModuleType | None) -> RopeInputs:
        """Once per forward: what every layer needs to rotate this step's q and k."""
        if fused is not None:  # the kernel reads the tables by position itself
            return RopeInputs(positions, self.cos_cached, self.sin_cached, fused)
        cos, sin = self.cos_sin(positions, dtype)
        return RopeInputs(positions, cos, sin, None)

    def cos_sin(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """[T, head_dim] cos and sin for the positions of this step, broadcast over heads later."""
        return self.cos_cached[positions].to(dtype).unsqueeze(1), self.sin_cached[positions].to(dtype).unsqueeze(1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [T, heads, head_dim]."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


@dataclass
class RopeInputs:
    positions: torch.Tensor  # [T]
    cos: torch.Tensor  # fused: the [max_positions, head_dim] table; else [T, 1, head_dim] for this step
    sin: torch.Tensor
    fused: ModuleType | None

    def rotate_(self, qkv: torch.Tensor, rotated_heads: int, head_dim: int) -> None:
        """Rotate the first `rotated_heads` heads of each row of qkv ([T, heads * head_dim]) in place."""
        if self.fused is not None:
            self.fused.rotary_inplace(qkv, self.positions, self.cos, self.sin, rotated_heads, head_dim)
            return
        qk = qkv[:, : rotated_heads * head_dim].view(-1, rotated_heads, head_dim)
        qk.copy_(apply_rotary(qk, self.cos, self.sin))
