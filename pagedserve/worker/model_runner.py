"""ModelRunner: owns the model, the KV cache tensors and the sampler; turns a SchedulerOutput into
sampled token ids per request.

prepare_inputs flattens every scheduled request's new tokens into one batch without padding, in the
order the attention backend asks for, computes their cache slots from the block tables and lets the
backend build its own metadata. A request whose new tokens reach past its last known token gets its
logits sampled (at every position from that token on: one row, or one per speculative token).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pagedserve.attention.metadata import CommonAttentionMetadata
from pagedserve.core.request import Request
from pagedserve.core.sched.output import SchedulerOutput
from pagedserve.engine.core_messages import RawLogprob
from pagedserve.model.config import ModelConfig
from pagedserve.sample.sampler import Sampler
from pagedserve.worker.runner_output import ModelRunnerOutput

PROMPT_LOGPROB_ROWS = 256


@dataclass
class ModelInputs:
    input_ids: torch.Tensor
    positions: torch.Tensor
    meta: object  # the attention backend's metadata
    sample_indices: torch.Tensor  # rows of the flat batch whose logits are sampled
    sampled: list[Request]  # in the same order as sample_indices (n > 1 forks repeat their sibling's row)
    # Prompt logprobs: (request, first row, first position, rows) of chunks that score prompt tokens.
    prompt_scoring: list[tuple[Request, int, int, int]]


def kv_block_bytes(cfg: ModelConfig, block_size: int, dtype: torch.dtype) -> int:
    elem = torch.empty((), dtype=dtype).element_size()
    return 2 * cfg.num_hidden_layers * block_size * cfg.num_key_value_heads * cfg.head_dim * elem


class ModelRunner:
    def __init__(self, model: torch.nn.Module, cfg: ModelConfig, num_blocks: int, block_size: int,
                 dtype: torch.dtype, device: torch.device) -> None:
        self.model = model
        self.block_size = block_size
        self.device = device
        self.backend = model.attention_backend
        # Pre-allocated once; requests only ever get block ids into these tensors. The model's
        # attention backend decides the layout.
        args = (num_blocks, block_size, cfg.num_key_value_heads, cfg.head_dim, dtype, device)
        self.kv_caches = [self.backend.allocate_kv_cache(*args) for _ in range(cfg.num_hidden_layers)]
        self.sampler = Sampler(model.fused)

    def _slots(self, table: list[int], start: int, end: int) -> list[int]:
        bs = self.block_size
        return [table[p // bs] * bs + p % bs for p in range(start, end)]

    def prepare_inputs(self, sched: SchedulerOutput) -> ModelInputs:
        scheduled = sched.scheduled
        order = self.backend.reorder_batch([s.num_new_tokens for s in scheduled])
        batch = [scheduled[i] for i in order]
        query_lens = [s.num_new_tokens for s in batch]
        ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        sample_rows: list[int] = []
        sampled: list[Request] = []
        scoring: list[tuple[Request, int, int, int]] = []
        seq_lens: list[int] = []
        for s in batch:
            req, start = s.request, s.request.num_computed_tokens
            end = start + s.num_new_tokens
            assert not s.num_spec_tokens, "verifying speculative tokens needs a rejection sampler"
            scored = min(end, req.num_prompt_tokens - 1) - start  # positions that predict a prompt token
            if req.params.prompt_logprobs is not None and scored > 0:
                scoring.append((req, len(ids), start, scored))
            ids.extend(req.token_ids_between(start, end))
            positions.extend(range(start, end))
            slots.extend(self._slots(s.block_ids, start, end))
            seq_lens.append(end)
            if end >= req.num_tokens:  # every known token is in the cache now: sample the next one
                for r in [req, *s.forks]:
                    sample_rows.append(len(ids) - 1)
                    sampled.append(r)
        dev = self.device
        slot_mapping = torch.tensor(slots, dtype=torch.long, device=dev)
        common = CommonAttentionMetadata(slot_mapping, query_lens, seq_lens,
                                         [s.block_ids for s in batch], self.block_size, dev)
        meta = self.backend.build_metadata(common)  # once per step, not per layer
        return ModelInputs(torch.tensor(ids, dtype=torch.long, device=dev),
                           torch.tensor(positions, dtype=torch.long, device=dev), meta,
                           torch.tensor(sample_rows, dtype=torch.long, device=dev), sampled, scoring)

    @torch.inference_mode()
    def execute(self, sched: SchedulerOutput) -> ModelRunnerOutput:
        """One forward, then sampling: the tokens each request gets this step."""
        self.sampler.forget(sched.finished_req_ids)
        self.backend.copy_blocks(self.kv_caches, sched.blocks_to_copy)  # before anything writes the copies
        inputs = self.prepare_inputs(sched)
        hidden = self.model(inputs.input_ids, inputs.positions, self.kv_caches, inputs.meta)
        prompt_logprobs = {req.request_id: (start, self._score_prompt(hidden, req, row, start, rows))
                           for req, row, start, rows in inputs.prompt_scoring}
        if not inputs.sampled:
            return ModelRunnerOutput(prompt_logprobs=prompt_logprobs)
        logits = self.model.compute_logits(hidden[inputs.sample_indices])
        result = self.sampler.sample(logits, inputs.sampled)
        logprobs = None
        if any(lp is not None for lp in result.logprobs):
            logprobs = [None if lp is None else [lp] for lp in result.logprobs]
        rows = {r.request_id: logits[i].float().clone() for i, r in enumerate(inputs.sampled)
                if r.beam_group is not None}
        return ModelRunnerOutput([r.request_id for r in inputs.sampled],
                                 [[t] for t in result.token_ids], logprobs, prompt_logprobs, rows)

    def _score_prompt(self, hidden: torch.Tensor, req: Request, row: int, start: int,
                      rows: int) -> list[RawLogprob]:
        """Logprobs of prompt tokens start+1 .. start+rows under the model's raw distribution (no
        temperature or penalties, as vLLM reports them), with the top-k at each position."""
        k = req.params.prompt_logprobs
        targets = torch.tensor(req.prompt_token_ids[start + 1:start + 1 + rows], device=hidden.device)
        out: list[RawLogprob] = []
        for lo in range(0, rows, PROMPT_LOGPROB_ROWS):  # bounded memory: rows x vocab floats at a time
            hi = min(rows, lo + PROMPT_LOGPROB_ROWS)
            logp = self.model.compute_logits(hidden[row + lo:row + hi]).float().log_softmax(dim=-1)
            chosen = logp.gather(1, targets[lo:hi, None]).squeeze(1).tolist()
            if k:
                top_vals, top_ids = logp.topk(k, dim=-1)
                tops = [list(zip(i, v, strict=True)) for i, v in zip(top_ids.tolist(), top_vals.tolist(), strict=True)]
            else:
                tops = [[] for _ in chosen]
            out.extend(zip(chosen, tops, strict=True))
        return out
