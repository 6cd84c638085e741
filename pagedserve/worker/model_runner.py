"""ModelRunner: owns the model, the KV cache tensors and the sampler; turns a SchedulerOutput into
sampled token ids per request.

prepare_inputs flattens every scheduled request's new tokens into one batch without padding, in the
order the attention backend asks for, computes their cache slots from the block tables and lets the
backend build its own metadata. A request whose new tokens reach past its last known token gets its
logits sampled (at every position from that token on: one row, or one per speculative token).

With speculative decoding, each request's rows are the target's tokens at the draft positions; the
drafts it agrees with are accepted (rejection_sampler.accept_prefix), and the speculator then drafts
the next step's proposals.

On CUDA, decode steps replay captured graphs (cuda_graphs.py): prepare_inputs then hands the step's
lists to DecodeGraphs, which copies them into its persistent buffers, instead of building metadata.

A pooling request (an embedding) is never sampled: its rows' final hidden states go to the Pooler,
which hands back its vector once the step completes its prompt (ModelRunnerOutput.pooler_output).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from pagedserve.attention.metadata import CommonAttentionMetadata
from pagedserve.core.request import Request
from pagedserve.core.sched.output import SchedulerOutput
from pagedserve.engine.core_messages import RawLogprob
from pagedserve.model.config import ModelConfig
from pagedserve.sample.rejection_sampler import accept_prefix
from pagedserve.sample.sampler import Sampler, SamplerOutput
from pagedserve.spec_decode.speculator import Speculator
from pagedserve.structured_output.manager import StructuredOutputManager
from pagedserve.worker.cuda_graphs import DecodeGraphs
from pagedserve.worker.flat_batch import TokenRun, build_flat_batch
from pagedserve.worker.pooler import Pooler
from pagedserve.worker.runner_output import ModelRunnerOutput

PROMPT_LOGPROB_ROWS = 256


@dataclass
class ModelInputs:
    input_ids: torch.Tensor | None  # None when a captured graph runs the step (see `graph_step`)
    positions: torch.Tensor | None
    meta: object  # the attention backend's metadata (None with a graph)
    sample_indices: torch.Tensor  # rows of the flat batch whose logits are sampled
    sampled: list[Request]  # in the same order as sample_indices (n > 1 forks repeat their sibling's row)
    # Per sampled row: the proposed tokens before its position that it assumes accepted (speculation).
    prefixes: list[list[int]]
    # Prompt logprobs: (request, first row, first position, rows) of chunks that score prompt tokens.
    prompt_scoring: list[tuple[Request, int, int, int]]
    # Per request in batch order: (request, first row, first position, tokens, block table).
    segments: list[tuple[Request, int, int, int, list[int]]]
    # A decode step a captured graph runs: (token ids, positions, slots, seq lens, block tables).
    graph_step: tuple[list[int], list[int], list[int], list[int], list[list[int]]] | None = None


def kv_block_bytes(cfg: ModelConfig, block_size: int, dtype: torch.dtype) -> int:
    """Bytes of one block id across every layer's K and V, with elements of `dtype` (the KV cache's)."""
    elem = torch.empty((), dtype=dtype).element_size()
    return 2 * cfg.num_hidden_layers * block_size * cfg.num_key_value_heads * cfg.head_dim * elem


class ModelRunner:
    def __init__(self, model: torch.nn.Module, cfg: ModelConfig, num_blocks: int, block_size: int,
                 kv_cache_dtype: torch.dtype, device: torch.device) -> None:
        self.model = model
        self.block_size = block_size
        self.device = device
        self.backend = model.attention_backend
        # Pre-allocated once; requests only ever get block ids into these tensors. The model's
        # attention backend decides the layout; the element type is EngineConfig.kv_cache_torch_dtype.
        args = (num_blocks, block_size, cfg.num_key_value_heads, cfg.head_dim, kv_cache_dtype, device)
        self.kv_caches = [self.backend.allocate_kv_cache(*args) for _ in range(cfg.num_hidden_layers)]
        self.sampler = Sampler(model.fused)
        self.speculator: Speculator | None = None  # set by the engine when speculative decoding is on
        self.structured: StructuredOutputManager | None = None  # set at the first constrained request
        self.pooler = Pooler()
        self.graphs: DecodeGraphs | None = None  # set by the engine on CUDA unless enforce_eager

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
        prefixes: list[list[int]] = []
        scoring: list[tuple[Request, int, int, int]] = []
        seq_lens: list[int] = []
        segments: list[tuple[Request, int, int, int, list[int]]] = []
        for s in batch:
            req, start = s.request, s.request.num_computed_tokens
            end = start + s.num_new_tokens
            segments.append((req, len(ids), start, s.num_new_tokens, s.block_ids))
            scored = min(end, req.num_prompt_tokens - 1) - start  # positions that predict a prompt token
            if req.params.prompt_logprobs is not None and scored > 0:
                scoring.append((req, len(ids), start, scored))
            ids.extend(req.token_ids_between(start, end))
            positions.extend(range(start, end))
            slots.extend(self._slots(s.block_ids, start, end))
            seq_lens.append(end)
            if s.num_spec_tokens:  # a row at the last known token and at each draft
                drafts = req.spec_token_ids[:s.num_spec_tokens]
                first = len(ids) - s.num_spec_tokens - 1
                for j in range(s.num_spec_tokens + 1):
                    sample_rows.append(first + j)
                    sampled.append(req)
                    prefixes.append(drafts[:j])
            elif end >= req.num_tokens and req.pooling_params is None:  # all known tokens cached: sample
                for r in [req, *s.forks]:
                    sample_rows.append(len(ids) - 1)
                    sampled.append(r)
                    prefixes.append([])
        dev = self.device
        sample_indices = torch.tensor(sample_rows, dtype=torch.long, device=dev)
        if self.graphs is not None and self.speculator is None and self.graphs.covers(query_lens):
            step = (ids, positions, slots, seq_lens, [s.block_ids for s in batch])
            return ModelInputs(None, None, None, sample_indices, sampled, prefixes, scoring, segments, step)
        slot_mapping = torch.tensor(slots, dtype=torch.long, device=dev)
        common = CommonAttentionMetadata(slot_mapping, query_lens, seq_lens,
                                         [s.block_ids for s in batch], self.block_size, dev)
        meta = self.backend.build_metadata(common)  # once per step, not per layer
        return ModelInputs(torch.tensor(ids, dtype=torch.long, device=dev),
                           torch.tensor(positions, dtype=torch.long, device=dev), meta,
                           sample_indices, sampled, prefixes, scoring, segments)

    @torch.inference_mode()
    def execute(self, sched: SchedulerOutput) -> ModelRunnerOutput:
        """One forward, then sampling: the tokens each request gets this step."""
        started = time.perf_counter()
        self.backend.copy_blocks(self.kv_caches, sched.blocks_to_copy)  # before anything writes the copies
        if self.speculator is not None:
            self.speculator.proposer.copy_blocks(sched.blocks_to_copy)
        self.forget(sched.finished_req_ids)
        inputs = self.prepare_inputs(sched)
        hidden = self.speculator.proposer.forward(inputs) if self.speculator is not None else None
        if hidden is None and inputs.graph_step is not None:
            hidden = self.graphs.run(*inputs.graph_step)
        elif hidden is None:  # (a proposer may run the step itself, reusing its drafting work)
            hidden = self.model(inputs.input_ids, inputs.positions, self.kv_caches, inputs.meta)
        prompt_logprobs = {req.request_id: (start, self._score_prompt(hidden, req, row, start, rows))
                           for req, row, start, rows in inputs.prompt_scoring}
        out = ModelRunnerOutput(prompt_logprobs=prompt_logprobs)
        out.pooler_output = self.pooler.pool(hidden, inputs.segments)
        if inputs.sampled:
            logits = self.model.compute_logits(hidden[inputs.sample_indices])
            if self.structured is not None:
                self.structured.apply(logits, inputs.sampled, inputs.prefixes)
            result = self.sampler.sample(logits, inputs.sampled, inputs.prefixes)
            self._collect(out, inputs, result)
            out.logits_rows = {r.request_id: logits[i].float().clone() for i, r in enumerate(inputs.sampled)
                               if r.beam_group is not None}
        if self.speculator is not None:
            emitted = dict(zip(out.req_ids, out.sampled_token_ids, strict=True))
            out.spec_token_ids = self.speculator.after_step(sched, emitted, time.perf_counter() - started)
        return out

    def forget(self, request_ids: set[str]) -> None:
        """Drop the state of requests that left the core (grammar matchers, partial pooling sums); the
        engine calls it on a step with nothing to run too, or that state would outlive an idle engine."""
        if self.structured is not None:
            self.structured.forget(request_ids)
        self.pooler.forget(request_ids)

    def _collect(self, out: ModelRunnerOutput, inputs: ModelInputs, result: SamplerOutput) -> None:
        """Rows → tokens per request: one row each, or, for a request verifying drafts, its accepted
        drafts and the target's token after them."""
        any_logprobs = any(lp is not None for lp in result.logprobs)
        logprobs: list[list | None] = []
        i, rows = 0, len(inputs.sampled)
        while i < rows:
            req = inputs.sampled[i]
            j = i + 1  # a request's draft rows are consecutive
            while j < rows and inputs.sampled[j] is req and inputs.prefixes[j]:
                j += 1
            if j - i == 1:
                tokens = [result.token_ids[i]]
            else:
                tokens = accept_prefix(result.token_ids[i:j], inputs.prefixes[j - 1])
                self.speculator.record_verification(req.request_id, j - i - 1, len(tokens) - 1)
            out.req_ids.append(req.request_id)
            out.sampled_token_ids.append(tokens)
            logprobs.append(result.logprobs[i:i + len(tokens)] if result.logprobs[i] is not None else None)
            i = j
        out.logprobs = logprobs if any_logprobs else None

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

    @torch.inference_mode()
    def prompt_log_softmax(self, token_ids: list[int], block_ids: list[int], first_target: int = 1,
                           chunk_tokens: int | None = None) -> torch.Tensor:
        """The model's full next-token log-softmax (float32, [len(token_ids) - first_target, vocab]) at
        the positions that predict tokens first_target.. of one sequence: row j is the distribution of
        token first_target + j given the tokens before it. For quality metrics (perplexity, KL), which
        need whole distributions where prompt logprobs keep a top-k.

        Outside the scheduler: the caller owns `block_ids` (enough for len(token_ids) - 1 slots). The
        tokens go through the model in chunks of at most `chunk_tokens`, each reading the earlier
        chunks' K/V back from the paged cache, as chunked prefill does. The last token is never fed:
        nothing is predicted from it.
        """
        if not 1 <= first_target < len(token_ids):
            raise ValueError(f"first_target must be in [1, {len(token_ids) - 1}], got {first_target}")
        fed = len(token_ids) - 1
        chunk = chunk_tokens or fed
        out: torch.Tensor | None = None
        for lo in range(0, fed, chunk):
            hi = min(fed, lo + chunk)
            batch = build_flat_batch(self.backend, self.block_size, self.device,
                                     [TokenRun(token_ids[lo:hi], lo, block_ids)])
            hidden = self.model(batch.input_ids, batch.positions, self.kv_caches, batch.meta)
            # Position p predicts token p + 1: keep positions first_target - 1 .. fed - 1.
            for p in range(max(first_target - 1, lo), hi, PROMPT_LOGPROB_ROWS):  # bounded logits memory
                q = min(hi, p + PROMPT_LOGPROB_ROWS)
                logp = self.model.compute_logits(hidden[p - lo:q - lo]).float().log_softmax(dim=-1)
                if out is None:
                    out = torch.empty((fed - first_target + 1, logp.shape[1]), device=logp.device)
                out[p - first_target + 1:q - first_target + 1] = logp
        assert out is not None
        return out
