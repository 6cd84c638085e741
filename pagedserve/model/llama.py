"""A Llama-family decoder (Llama 2/3, Mistral, Qwen2, SmolLM2) running on the paged KV cache.

Tokens of all requests in a step are one flat [T, hidden] batch (no padding); attention is the
only place where requests are told apart, through AttentionMetadata.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from types import ModuleType
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from pagedserve.attention.backends import AttentionBackend, TorchPagedAttention, select_attention_backend
from pagedserve.kernels import cpu_ops
from pagedserve.model.config import ModelConfig
from pagedserve.model.layers.linear import Linear
from pagedserve.model.layers.rmsnorm import RMSNorm
from pagedserve.model.layers.rotary import RopeInputs, RotaryEmbedding
from pagedserve.model.quantization import GGUFBlockLinearMethod, tensor_bytes
from pagedserve.model.quantization.gguf_blocks import BlockCodes, BlockEmbedding, concat_blocks


class LlamaAttention(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.num_heads = cfg.num_attention_heads
        self.num_kv_heads = cfg.num_key_value_heads
        self.head_dim = cfg.head_dim
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        # q, k and v in one matmul: one pass over the activations instead of three.
        self.qkv_proj = Linear(cfg.hidden_size, self.q_size + 2 * self.kv_size, bias=cfg.qkv_bias)
        self.o_proj = Linear(self.q_size, cfg.hidden_size, bias=cfg.o_bias)
        self.scale = self.head_dim ** -0.5
        self.attention: AttentionBackend = TorchPagedAttention()

    def forward(self, x: torch.Tensor, rope: RopeInputs, kv_cache: tuple[torch.Tensor, torch.Tensor],
                meta: Any) -> torch.Tensor:
        qkv = self.qkv_proj(x)
        # q and k sit side by side in qkv: rotate them in one go, in place (fewer kernels per layer).
        rope.rotate_(qkv, self.num_heads + self.num_kv_heads, self.head_dim)
        q = qkv[:, : self.q_size].view(-1, self.num_heads, self.head_dim)
        k = qkv[:, self.q_size: self.q_size + self.kv_size].view(-1, self.num_kv_heads, self.head_dim)
        v = qkv[:, self.q_size + self.kv_size:].view(-1, self.num_kv_heads, self.head_dim)
        out = self.attention(q, k, v, kv_cache[0], kv_cache[1], meta, self.scale)
        return self.o_proj(out.view(-1, self.q_size))


class LlamaMLP(nn.Module):
    fused: ModuleType | None = None

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.intermediate = cfg.intermediate_size
        self.gate_up_proj = Linear(cfg.hidden_size, 2 * cfg.intermediate_size, bias=False)
        self.down_proj = Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate_up = self.gate_up_proj(x)
        if self.fused is not None:
            return self.down_proj(self.fused.silu_and_mul(gate_up))
        gate, up = gate_up.split(self.intermediate, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class LlamaDecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = LlamaAttention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = LlamaMLP(cfg)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None, rope: RopeInputs,
                kv_cache: tuple[torch.Tensor, torch.Tensor], meta: Any):
        """(hidden, residual) in and out: each residual add is fused into the norm that follows it."""
        if residual is None:
            x, residual = self.input_layernorm(x), x
        else:
            x, residual = self.input_layernorm(x, residual)
        x = self.self_attn(x, rope, kv_cache, meta)
        x, residual = self.post_attention_layernorm(x, residual)
        return self.mlp(x), residual


class LlamaForCausalLM(nn.Module):
    fused: ModuleType | None = None
    stack: Any = None  # the C++ DecoderStack when the fused CPU kernels apply

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.config = cfg
        self.attention_backend: AttentionBackend = TorchPagedAttention()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(LlamaDecoderLayer(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.rotary = RotaryEmbedding(cfg.head_dim, cfg.max_position_embeddings, cfg.rope_theta, cfg.rope_scaling)
        self.lm_head = None if cfg.tie_word_embeddings else Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if self.lm_head is None:  # tied: a Linear sharing the embedding matrix (same fast path as lm_head)
            self.output_projection = Linear(1, 1, bias=False)
            self.output_projection.weight = self.embed_tokens.weight
        else:
            self.output_projection = self.lm_head

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                kv_caches: list[tuple[torch.Tensor, torch.Tensor]], meta: Any) -> torch.Tensor:
        """Hidden states [T, hidden] after the final norm. `meta` is the attention backend's own."""
        x = self.embed_tokens(input_ids)
        if self.stack is not None:  # the same kernels in the same order, called from C++
            return self.stack.forward(x, positions, self.rotary.cos_cached, self.rotary.sin_cached, kv_caches,
                                      *meta.stack_args())
        rope = self.rotary.prepare(positions, x.dtype, self.fused)
        residual = None
        for layer, kv_cache in zip(self.layers, kv_caches, strict=True):
            x, residual = layer(x, residual, rope, kv_cache, meta)
        return self.norm(x, residual)[0]

    @torch.inference_mode()
    def forward_layers(self, x: torch.Tensor, residual: torch.Tensor | None, start: int, end: int,
                       positions: torch.Tensor, kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
                       meta: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """Layers [start, end) on the stream between layers: (x, residual) in and out, no final norm.
        For start 0, x is the embeddings and residual None. The same kernels as `forward`."""
        if self.stack is not None:
            return self.stack.forward_layers(x, residual, start, end, positions, self.rotary.cos_cached,
                                             self.rotary.sin_cached, kv_caches, *meta.stack_args())
        rope = self.rotary.prepare(positions, x.dtype, self.fused)
        for layer, kv_cache in zip(self.layers[start:end], kv_caches[start:end], strict=True):
            x, residual = layer(x, residual, rope, kv_cache, meta)
        return x, residual

    @torch.inference_mode()
    def final_norm(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        """norm(x + residual) as `forward` ends, leaving x and residual as they are."""
        if self.stack is not None:
            return self.stack.final_norm(x, residual)
        return self.norm(x.clone(), residual.clone())[0]

    @torch.inference_mode()
    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.output_projection(hidden).float()

    def prepare_for_inference(self, cpu_kernels: bool = True, decoder_stack: bool = True,
                              quantized_matmul: bool = True, quantization: str | None = None) -> None:
        """After the weights are final (loaded, cast, moved): the fused CPU kernels where they apply
        (float32 on CPU, enabled, and they built), each linear layer's method (`quantization`: int8 or
        w8a8 quantizes them now), the attention backend, and the C++ decoder stack over all of it."""
        weight = self.embed_tokens.weight
        on_cpu_fp32 = weight.device.type == "cpu" and weight.dtype == torch.float32
        self.fused = cpu_ops() if on_cpu_fp32 and cpu_kernels else None
        tied_blocks = self.output_projection.quant_blocks if self.lm_head is None else None
        for linear in self._linears():  # a tied output projection shares the embedding: released below
            linear.prepare_cpu_paths(self.fused, quantized_matmul, quantization,
                                     owns_weight=linear is not self.output_projection or self.lm_head is not None)
        if tied_blocks is not None and isinstance(self.output_projection.quant_method, GGUFBlockLinearMethod):
            # lookups from the embedding's own blocks: the same float32 rows, a fraction of the memory
            self.embed_tokens = BlockEmbedding(tied_blocks)
            self.output_projection.weight = nn.Parameter(weight.new_empty(0), requires_grad=False)
        self.attention_backend = select_attention_backend(weight.device, weight.dtype, self.fused)
        self.norm.fused = self.fused
        for layer in self.layers:
            layer.input_layernorm.fused = layer.post_attention_layernorm.fused = layer.mlp.fused = self.fused
            layer.self_attn.attention = self.attention_backend
        self.stack = self._decoder_stack() if self.fused is not None and decoder_stack else None

    def weight_bytes(self) -> int:
        """Memory of the weights as the engine holds them: parameters (each shared tensor once) plus
        what the linear layers' methods keep (packed blocks, int8 codes, float32 panels)."""
        params = {id(p): p.numel() * p.element_size() for p in self.parameters()}
        lookups = tensor_bytes(*self.embed_tokens.buffers())
        return sum(params.values()) + lookups + sum(linear.quant_method.nbytes for linear in self._linears())

    def _linears(self) -> list[Linear]:
        out = [self.output_projection]
        for layer in self.layers:
            out += [layer.self_attn.qkv_proj, layer.self_attn.o_proj, layer.mlp.gate_up_proj, layer.mlp.down_proj]
        return out

    def _decoder_stack(self):
        """The C++ DecoderStack over this model's weights (pagedserve/kernels/decoder_stack.cpp)."""
        cfg, fused = self.config, self.fused
        layers = [fused.FusedLayer(layer.input_layernorm.weight.detach(),
                                   layer.post_attention_layernorm.weight.detach(),
                                   layer.self_attn.qkv_proj.fused_linear, layer.self_attn.o_proj.fused_linear,
                                   layer.mlp.gate_up_proj.fused_linear, layer.mlp.down_proj.fused_linear)
                  for layer in self.layers]
        return fused.DecoderStack(layers, self.norm.weight.detach(), cfg.num_attention_heads,
                                  cfg.num_key_value_heads, cfg.head_dim, cfg.rms_norm_eps, cfg.head_dim ** -0.5)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Take HF-named tensors; q/k/v and gate/up are concatenated into the fused projections."""
        params = dict(self.named_parameters())
        loaded: set[str] = set()
        for name, tensor in _fuse_projections(weights):
            if "rotary_emb" in name:
                continue
            if self.lm_head is None and name == "lm_head.weight":
                continue  # tied: the embedding is the output projection
            self._copy(params, name, tensor)
            loaded.add(name)
        missing = set(params) - loaded
        if missing:
            raise ValueError(f"checkpoint is missing weights: {sorted(missing)[:8]}")

    def attach_quantized(self, weights: Iterable[tuple[str, BlockCodes]]) -> None:
        """Keep the checkpoint's quantized blocks (name, BlockCodes) beside the float32 weights of the
        linear layers that had them (q/k/v and gate/up only when their parts share a kernel layout;
        a tied output projection takes the embedding's)."""
        linears = {name + ".weight": m for name, m in self.named_modules() if isinstance(m, Linear)}
        if self.lm_head is None:
            linears["embed_tokens.weight"] = self.output_projection
        for name, blocks in _fuse_projections(weights, concat_blocks):
            module = linears.get(name)
            if blocks is not None and module is not None and tuple(blocks.codes.shape) == tuple(module.weight.shape):
                module.quant_blocks = blocks

    @staticmethod
    def _copy(params: dict[str, nn.Parameter], name: str, tensor: torch.Tensor) -> None:
        if name not in params:
            raise ValueError(f"unexpected weight {name!r} in checkpoint")
        if params[name].shape != tensor.shape:
            raise ValueError(f"weight {name!r}: checkpoint shape {tuple(tensor.shape)} != model "
                             f"{tuple(params[name].shape)}")
        with torch.no_grad():
            params[name].copy_(tensor)


_FUSED_PARTS = {"q_proj": ("qkv_proj", 0, 3), "k_proj": ("qkv_proj", 1, 3), "v_proj": ("qkv_proj", 2, 3),
                "gate_proj": ("gate_up_proj", 0, 2), "up_proj": ("gate_up_proj", 1, 2)}


def _fuse_projections(weights: Iterable[tuple[str, Any]],
                      concat: Callable[[list[Any]], Any] = torch.cat) -> Iterable[tuple[str, Any]]:
    """HF names → this model's names: q/k/v rows concatenated into qkv_proj, gate/up into gate_up_proj
    (a fused tensor comes out once all its parts have; one with a part missing never does)."""
    pending: dict[str, dict[int, torch.Tensor]] = {}
    for name, tensor in weights:
        name = name.removeprefix("model.")
        parts = name.split(".")
        if len(parts) >= 2 and parts[-2] in _FUSED_PARTS:
            target, index, need = _FUSED_PARTS[parts[-2]]
            fused_name = ".".join(parts[:-2] + [target, parts[-1]])
            group = pending.setdefault(fused_name, {})
            group[index] = tensor
            if len(group) == need:
                yield fused_name, concat([group[i] for i in range(need)])
                del pending[fused_name]
            continue
        yield name, tensor
