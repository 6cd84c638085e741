"""A smaller model with the target's tokenizer drafts k tokens per request, greedily, one batched
forward per draft position.

Its paged KV cache sits beside the target's with the same number of blocks and the same block size,
and it is addressed through the target's block tables: whatever the target's KV manager allocates,
frees, preempts, forks or copies on write, the draft's cache follows without a second manager.

The draft runs only in steps that draft: its first pass catches up on every token of the request it
has not computed yet (the step's verified tokens, or everything since it last drafted, as one chunk)
and proposes the first token, so a step the controller keeps plain costs the draft nothing. A request
the target recomputes (after a preemption) is recomputed by the draft too when it next drafts; a
prefix-cache hit is trusted to hold the draft's K/V as well. Draft K/V only steers proposals: a stale
slot can cost acceptance, never a wrong output token.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import TYPE_CHECKING

import torch

from pagedserve.model.loader import load_config, load_tokenizer, resolve_model_path
from pagedserve.spec_decode.config import SpeculativeConfig
from pagedserve.spec_decode.proposer import DraftItem
from pagedserve.worker.flat_batch import TokenRun, build_flat_batch

if TYPE_CHECKING:
    from pagedserve.engine.core import EngineCore


class DraftModelProposer:
    def __init__(self, model: torch.nn.Module, num_blocks: int, block_size: int, kv_cache_dtype: torch.dtype,
                 device: torch.device) -> None:
        self.model = model
        self.backend = model.attention_backend
        self.block_size = block_size
        self.device = device
        cfg = model.config
        # The draft's cache has the target's element type too (kv_cache_dtype applies to both).
        args = (num_blocks, block_size, cfg.num_key_value_heads, cfg.head_dim, kv_cache_dtype, device)
        self.kv_caches = [self.backend.allocate_kv_cache(*args) for _ in range(cfg.num_hidden_layers)]
        self._computed: dict[str, int] = {}  # request -> positions 0.. whose draft K/V is written
        self.pass_seconds: list[float] = []  # the last propose()'s passes (the first one catches up)

    model_based = True

    @classmethod
    def build(cls, spec: SpeculativeConfig, core: EngineCore) -> DraftModelProposer:
        from pagedserve.engine.core import build_model

        try:
            path = resolve_model_path(spec.model)
        except (FileNotFoundError, ValueError) as exc:
            raise ValueError(f"speculative_config.model: {exc}") from None
        cfg = load_config(path)
        target = core.model_config
        if cfg.vocab_size != target.vocab_size:
            raise ValueError(f"speculative_config.model must share the target's vocabulary: the draft has "
                             f"{cfg.vocab_size} tokens, the target {target.vocab_size}")
        if load_tokenizer(path).get_vocab() != load_tokenizer(core.model_path).get_vocab():
            raise ValueError("speculative_config.model must share the target's tokenizer: same vocabulary "
                             "size, different tokens")
        if cfg.max_position_embeddings < core.max_model_len:
            raise ValueError(f"speculative_config.model's context ({cfg.max_position_embeddings}) is shorter "
                             f"than the target's max_model_len ({core.max_model_len})")
        model = build_model(core.config, path, cfg)
        return cls(model, core.kv.pool.num_blocks, core.kv.block_size, core.config.kv_cache_torch_dtype,
                   torch.device(core.config.device))

    def _done(self, item: DraftItem) -> int:
        """Positions 0.. of the request whose draft K/V stands."""
        done = self._computed.get(item.request.request_id, item.start)  # new: what the target skipped is cached
        return item.start if item.start < done - 1 else done  # the target recomputes (a preemption): so must it

    def pending_tokens(self, item: DraftItem) -> int:
        """Tokens of the request the draft would have to compute before it could propose."""
        return len(item.token_ids) - self._done(item)

    @torch.inference_mode()
    def propose(self, items: list[DraftItem]) -> dict[str, list[int]]:
        # Pass 1: each drafting request's tokens the draft has not computed, through the one just sampled.
        runs, drafting = [], []
        self.pass_seconds = []
        for i, item in enumerate(items):
            rid = item.request.request_id
            done = self._computed[rid] = self._done(item)
            if item.max_drafts > 0 and item.sampled:
                runs.append(TokenRun(item.token_ids[done:], done, item.block_ids))
                drafting.append(i)
                self._computed[rid] = len(item.token_ids)
        if not runs:
            return {}
        first = self._forward(runs, list(range(len(runs))))
        drafts = {items[i].request.request_id: [t] for i, t in zip(drafting, first, strict=True)}
        # Passes 2..k: one token per request still drafting.
        for j in range(1, max((items[i].max_drafts for i in drafting), default=0)):
            live = [i for i in drafting if items[i].max_drafts > j]
            if not live:
                break
            step = []
            for i in live:
                item = items[i]
                pos = len(item.token_ids) - 1 + j
                step.append(TokenRun([drafts[item.request.request_id][-1]], pos, item.block_ids))
            for i, t in zip(live, self._forward(step, list(range(len(step)))), strict=True):
                drafts[items[i].request.request_id].append(t)
        return drafts

    def _forward(self, runs: list[TokenRun], wanted: list[int]) -> list[int]:
        """Write the runs' K/V into the draft cache; the argmax after the last token of runs `wanted`."""
        started = time.perf_counter()
        batch = build_flat_batch(self.backend, self.block_size, self.device, runs)
        hidden = self.model(batch.input_ids, batch.positions, self.kv_caches, batch.meta)
        tokens = []
        if wanted:
            rows = torch.tensor([batch.last_rows[i] for i in wanted], dtype=torch.long, device=hidden.device)
            tokens = self.model.compute_logits(hidden[rows]).argmax(dim=-1).tolist()
        self.pass_seconds.append(time.perf_counter() - started)
        return tokens

    def forward(self, inputs) -> None:
        return None  # the step's forward is the runner's own

    def copy_blocks(self, copies: list[tuple[int, int]]) -> None:
        self.backend.copy_blocks(self.kv_caches, copies)

    def forget(self, request_ids: Iterable[str]) -> None:
        for rid in request_ids:
            self._computed.pop(rid, None)
