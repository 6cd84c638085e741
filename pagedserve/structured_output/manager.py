"""StructuredOutputManager: compiled grammars (xgrammar) and one matcher per constrained request; masks
the rows of a step's logits so that only tokens the grammar allows next can be sampled.

A matcher follows its request's output tokens: before each mask it accepts the tokens the request has
gained since (so n > 1 forks, preemption and recomputation need no bookkeeping). A row that verifies
speculative drafts is masked at the state after its drafts, found by accepting them and rolling back.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import torch

from pagedserve.core.request import Request
from pagedserve.structured_output.params import StructuredOutputsParams


class StructuredOutputManager:
    def __init__(self, tokenizer: Any | Callable[[], Any], vocab_size: int, ops: Any = None) -> None:
        """`tokenizer`: the HF tokenizer, or a function that loads it (then on the worker thread, with
        xgrammar's vocabulary tables: seconds that no step waits for). `ops`: the fused CPU kernels
        (their word-wise mask), or None for xgrammar's own kernel."""
        import xgrammar as xgr  # only engines that see a constrained request pay for the import

        self._xgr = xgr
        self.vocab_size = vocab_size
        self._ops = ops
        # Grammars compile on one worker thread, off the engine step (pending.py holds their requests);
        # its first job builds the compiler, so the first grammar waits for that too.
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="grammar-compile")
        self._compiler = self._worker.submit(self._build_compiler, tokenizer)
        self._compiled: dict[tuple[str, str], Future] = {}
        self._matchers: dict[str, tuple[Any, int]] = {}  # request id -> (matcher, output tokens it has seen)
        self._batch = xgr.BatchGrammarMatcher(max_threads=1)
        self.compile_seconds: list[float] = []  # one entry per grammar compiled (not per cache hit)

    def compile_async(self, params: StructuredOutputsParams) -> Future:
        """The compiled grammar as a future: done at once for a cached one, else compiling."""
        key = params.key()
        future = self._compiled.get(key)
        if future is None or (future.done() and future.exception() is not None):  # a failure is not cached
            future = self._compiled[key] = self._worker.submit(self._compile, params)
        return future

    def compile(self, params: StructuredOutputsParams) -> Any:
        """The compiled grammar, waiting for it if it is still compiling."""
        return self.compile_async(params).result()

    def _build_compiler(self, tokenizer: Any) -> Any:
        if callable(tokenizer) and not hasattr(tokenizer, "encode"):
            tokenizer = tokenizer()
        info = self._xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=self.vocab_size)
        return self._xgr.GrammarCompiler(info, max_threads=1)

    def _compile(self, params: StructuredOutputsParams) -> Any:
        start = time.perf_counter()
        compiled = self._compiler.result().compile_grammar(params.to_grammar())  # params checked the grammar parses
        self.compile_seconds.append(time.perf_counter() - start)
        return compiled

    def _matcher(self, req: Request) -> Any:
        entry = self._matchers.get(req.request_id)
        if entry is None:
            grammar = self.compile(req.params.structured_outputs)
            entry = (self._xgr.GrammarMatcher(grammar), 0)  # rollback depth is unlimited
        matcher, seen = entry
        for token in req.output_token_ids[seen:]:
            if not matcher.is_terminated():
                matcher.accept_token(token)  # refused only after the grammar ended (ignore_eos)
        self._matchers[req.request_id] = (matcher, len(req.output_token_ids))
        return matcher

    def apply(self, logits: torch.Tensor, rows: list[Request], prefixes: list[list[int]]) -> None:
        """Mask, in place, the logits rows [N, V] of constrained requests (others are left alone)."""
        constrained = [i for i, r in enumerate(rows) if r.params.structured_outputs is not None]
        if not constrained:
            return
        xgr = self._xgr
        bitmask = xgr.allocate_token_bitmask(len(rows), self.vocab_size)  # all tokens allowed
        # Rows at a matcher's current state are filled together in one call; a row after speculative
        # drafts shares its request's matcher with the other draft rows, so it is filled on its own
        # (accept the drafts, fill, roll back) and every matcher is back at its state for the batch.
        batch: list[Any] = []
        batch_rows: list[int] = []
        for i in constrained:
            matcher = self._matcher(rows[i])
            if not prefixes[i] and not matcher.is_terminated():
                batch.append(matcher)
                batch_rows.append(i)
                continue
            taken = 0
            for token in prefixes[i]:  # the drafts this row comes after
                if not matcher.accept_token(token):
                    break
                taken += 1
            if taken == len(prefixes[i]) and not matcher.is_terminated():
                matcher.fill_next_token_bitmask(bitmask, i)
            elif taken == len(prefixes[i]):  # the grammar is complete: only a stop token may follow
                bitmask[i] = 0
                for stop in matcher.stop_token_ids:  # bit 31 of an int32 word is its sign
                    bit = 1 << (stop % 32)
                    bitmask[i, stop // 32] |= bit - (1 << 32) if bit >= 1 << 31 else bit
            # else: a draft the grammar refuses; this row's token is never used (the draft is rejected)
            if taken:
                matcher.rollback(taken)
        if batch:
            self._batch.batch_fill_next_token_bitmask(batch, bitmask, batch_rows)
        if self._ops is not None and logits.dtype == torch.float32 and logits.device.type == "cpu" \
                and logits.is_contiguous():
            self._ops.apply_token_bitmask_(logits, bitmask, torch.tensor(constrained, dtype=torch.long))
        else:
            xgr.apply_token_bitmask_inplace(logits, bitmask, vocab_size=self.vocab_size, indices=constrained)

    def forget(self, request_ids: set[str]) -> None:
        for rid in request_ids:
            self._matchers.pop(rid, None)
