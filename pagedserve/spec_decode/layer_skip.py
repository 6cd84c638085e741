"""Self-speculation: the target's own first m layers, then its final norm and LM head, draft k tokens
greedily (Draft & Verify, arXiv 2309.08168, with the simplest layer choice: the first m).

No second model and no second cache: the draft's K/V for layers 0..m-1 is written into the target's
cache at the slots the verified tokens will occupy. Verification reuses the draft's work: the drafted
tokens' streams after layer m-1 are kept, and the next step sends them through layers m..N-1 only;
just the last draft (whose state the drafting never computed) and the batch's other tokens start from
layer 0. A kept state is used only when the step verifies exactly the tokens it was computed for.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from pagedserve.spec_decode.config import SpeculativeConfig
from pagedserve.spec_decode.proposer import DraftItem
from pagedserve.worker.flat_batch import TokenRun, build_flat_batch

if TYPE_CHECKING:
    from pagedserve.engine.core import EngineCore
    from pagedserve.worker.model_runner import ModelInputs


@dataclass
class _Kept:
    """A request's drafting states: positions start.., the tokens at them, their stream after layer m-1."""

    start: int
    token_ids: list[int]
    x: torch.Tensor  # [len(token_ids), hidden]
    residual: torch.Tensor


class LayerSkipProposer:
    def __init__(self, model: torch.nn.Module, kv_caches: list, num_draft_layers: int, block_size: int,
                 device: torch.device) -> None:
        self.model = model
        self.kv_caches = kv_caches  # the target's
        self.m = num_draft_layers
        self.num_layers = len(kv_caches)
        self.block_size = block_size
        self.device = device
        self._kept: dict[str, _Kept] = {}

    model_based = True

    @classmethod
    def build(cls, spec: SpeculativeConfig, core: EngineCore) -> LayerSkipProposer:
        layers = core.model_config.num_hidden_layers
        if spec.num_draft_layers >= layers:
            raise ValueError(f"speculative_config.num_draft_layers must be < the target's {layers} layers, "
                             f"got {spec.num_draft_layers}")
        return cls(core.model, core.runner.kv_caches, spec.num_draft_layers, core.kv.block_size,
                   torch.device(core.config.device))

    @torch.inference_mode()
    def propose(self, items: list[DraftItem]) -> dict[str, list[int]]:
        drafting = [it for it in items if it.max_drafts > 0 and it.sampled]
        drafts: dict[str, list[int]] = {}
        xs: dict[str, list[torch.Tensor]] = {}
        rs: dict[str, list[torch.Tensor]] = {}
        for j in range(max((it.max_drafts for it in drafting), default=0)):
            live = [it for it in drafting if it.max_drafts > j]
            runs = []
            for it in live:
                rid = it.request.request_id
                token = it.token_ids[-1] if j == 0 else drafts[rid][-1]
                runs.append(TokenRun([token], len(it.token_ids) - 1 + j, it.block_ids))
            batch = build_flat_batch(self.model.attention_backend, self.block_size, self.device, runs)
            x, residual = self.model.forward_layers(self.model.embed_tokens(batch.input_ids), None, 0, self.m,
                                                    batch.positions, self.kv_caches, batch.meta)
            rows = torch.tensor(batch.last_rows, dtype=torch.long, device=x.device)
            x, residual = x[rows], residual[rows]  # in the order of `live`
            tokens = self.model.compute_logits(self.model.final_norm(x, residual)).argmax(dim=-1).tolist()
            for i, (it, token) in enumerate(zip(live, tokens, strict=True)):
                rid = it.request.request_id
                drafts.setdefault(rid, []).append(token)
                xs.setdefault(rid, []).append(x[i])
                rs.setdefault(rid, []).append(residual[i])
        for it in drafting:
            rid = it.request.request_id
            # States of the last known token and of every draft but the last.
            self._kept[rid] = _Kept(len(it.token_ids) - 1, [it.token_ids[-1], *drafts[rid][:-1]],
                                    torch.stack(xs[rid]), torch.stack(rs[rid]))
        return drafts

    @torch.inference_mode()
    def forward(self, inputs: ModelInputs) -> torch.Tensor | None:
        """The step's forward with the kept states continued from layer m, or None when none applies."""
        reuse: list[tuple[int, int, _Kept]] = []  # (first row, rows reused, kept)
        fresh: list[tuple[int, TokenRun]] = []  # (first row, run from layer 0)
        ids = inputs.input_ids.tolist()
        for req, row, start, n, block_ids in inputs.segments:
            kept = self._kept.pop(req.request_id, None)
            r = 0
            if kept is not None and kept.start == start:
                r = min(n, len(kept.token_ids))
                if ids[row:row + r] != kept.token_ids[:r]:
                    r = 0
            if r:
                reuse.append((row, r, kept))
            if r < n:
                fresh.append((row + r, TokenRun(ids[row + r:row + n], start + r, block_ids)))
        if not reuse:
            return None
        model, T = self.model, len(ids)
        x = torch.empty((T, model.config.hidden_size), dtype=model.norm.weight.dtype, device=self.device)
        residual = torch.empty_like(x)
        if fresh:
            batch = build_flat_batch(model.attention_backend, self.block_size, self.device, [r for _, r in fresh])
            xa, ra = model.forward_layers(model.embed_tokens(batch.input_ids), None, 0, self.m, batch.positions,
                                          self.kv_caches, batch.meta)
            dst, src = [], []
            for (row, run), last in zip(fresh, batch.last_rows, strict=True):
                n = len(run.token_ids)
                dst.extend(range(row, row + n))
                src.extend(range(last - n + 1, last + 1))
            dst_t = torch.tensor(dst, dtype=torch.long, device=self.device)
            src_t = torch.tensor(src, dtype=torch.long, device=self.device)
            x[dst_t] = xa[src_t]
            residual[dst_t] = ra[src_t]
        for row, r, kept in reuse:
            x[row:row + r] = kept.x[:r]
            residual[row:row + r] = kept.residual[:r]
        x, residual = model.forward_layers(x, residual, self.m, self.num_layers, inputs.positions, self.kv_caches,
                                           inputs.meta)
        return model.final_norm(x, residual)

    def copy_blocks(self, copies: list[tuple[int, int]]) -> None:
        pass  # its K/V is the target's, which the runner copies

    def forget(self, request_ids: Iterable[str]) -> None:
        for rid in request_ids:
            self._kept.pop(rid, None)
