"""ModelRunner: owns the model and the KV cache tensors; turns a SchedulerOutput into logits.

prepare_inputs flattens every scheduled request's new tokens into one batch without padding
(decodes first, then prefill segments) and computes their cache slots from the block tables.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pagedserve.attention.metadata import AttentionMetadata, PrefillSegment
from pagedserve.core.scheduler import ScheduledRequest, SchedulerOutput
from pagedserve.model.config import ModelConfig


@dataclass
class ModelInputs:
    input_ids: torch.Tensor
    positions: torch.Tensor
    meta: AttentionMetadata
    sample_indices: torch.Tensor  # rows of the flat batch whose logits are sampled
    sampled: list[ScheduledRequest]  # in the same order as sample_indices


def kv_block_bytes(cfg: ModelConfig, block_size: int, dtype: torch.dtype) -> int:
    elem = torch.empty((), dtype=dtype).element_size()
    return 2 * cfg.num_hidden_layers * block_size * cfg.num_key_value_heads * cfg.head_dim * elem


class ModelRunner:
    def __init__(self, model: torch.nn.Module, cfg: ModelConfig, num_blocks: int, block_size: int,
                 dtype: torch.dtype, device: torch.device) -> None:
        self.model = model
        self.block_size = block_size
        self.device = device
        # Pre-allocated once; requests only ever get block ids into these tensors. The model's
        # attention backend decides the layout.
        args = (num_blocks, block_size, cfg.num_key_value_heads, cfg.head_dim, dtype, device)
        self.kv_caches = [model.attention_backend.allocate_kv_cache(*args) for _ in range(cfg.num_hidden_layers)]

    def _slots(self, table: list[int], start: int, end: int) -> list[int]:
        bs = self.block_size
        return [table[p // bs] * bs + p % bs for p in range(start, end)]

    def prepare_inputs(self, sched: SchedulerOutput) -> ModelInputs:
        decodes = [s for s in sched.scheduled if s.num_new_tokens == 1]
        prefills = [s for s in sched.scheduled if s.num_new_tokens > 1]
        ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        sample_rows: list[int] = []
        sampled: list[ScheduledRequest] = []
        dev = self.device

        for s in decodes:
            req, pos = s.request, s.request.num_computed_tokens
            ids.append(req.token_at(pos))
            positions.append(pos)
            slots.extend(self._slots(s.block_table, pos, pos + 1))
        segments = []
        for s in prefills:
            req, start = s.request, s.request.num_computed_tokens
            end = start + s.num_new_tokens
            segments.append(PrefillSegment(len(ids), s.num_new_tokens, end,
                                           torch.tensor(s.block_table[: -(-end // self.block_size)],
                                                        dtype=torch.long, device=dev)))
            ids.extend(req.all_token_ids[start:end])
            positions.extend(range(start, end))
            slots.extend(self._slots(s.block_table, start, end))
        offset = 0
        for s in decodes + prefills:
            offset += s.num_new_tokens
            if s.completes_prompt:
                sample_rows.append(offset - 1)
                sampled.append(s)

        block_tables = context_lens = None
        if decodes:
            lens = [s.request.num_computed_tokens + 1 for s in decodes]
            max_blocks = -(-max(lens) // self.block_size)
            padded = [s.block_table[:max_blocks] + [0] * (max_blocks - min(len(s.block_table), max_blocks))
                      for s in decodes]
            block_tables = torch.tensor(padded, dtype=torch.long, device=dev)
            context_lens = torch.tensor(lens, dtype=torch.long, device=dev)

        meta = AttentionMetadata(
            slot_mapping=torch.tensor(slots, dtype=torch.long, device=dev),
            num_decode_tokens=len(decodes),
            decode_block_tables=block_tables,
            decode_context_lens=context_lens,
            prefills=segments,
        )
        self.model.attention_backend.prepare_step(meta, self.kv_caches[0][0])  # once per step, not per layer
        return ModelInputs(torch.tensor(ids, dtype=torch.long, device=dev),
                           torch.tensor(positions, dtype=torch.long, device=dev), meta,
                           torch.tensor(sample_rows, dtype=torch.long, device=dev), sampled)

    @torch.inference_mode()
    def execute(self, sched: SchedulerOutput) -> tuple[torch.Tensor, list[ScheduledRequest]]:
        """Run one forward; return logits [num_sampled, vocab] (float32) and who they belong to."""
        inputs = self.prepare_inputs(sched)
        hidden = self.model(inputs.input_ids, inputs.positions, self.kv_caches, inputs.meta)
        if not inputs.sampled:
            return hidden.new_empty((0, 0)), []
        return self.model.compute_logits(hidden[inputs.sample_indices]), inputs.sampled
