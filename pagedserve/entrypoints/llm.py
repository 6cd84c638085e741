"""Offline inference: `LLM(model=...).generate(prompts, params)`, `.chat(messages, params)` and
`.embed(prompts)`."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

from tqdm import tqdm

from pagedserve.config import EngineConfig
from pagedserve.engine.llm_engine import LLMEngine, PromptType
from pagedserve.outputs import EmbeddingRequestOutput, RequestOutput
from pagedserve.pooling_params import PoolingParams
from pagedserve.sampling_params import BeamSearchParams, SamplingParams

Message = dict[str, str]


@dataclass
class BeamSearchSequence:
    tokens: list[int]  # generated tokens (the EOS that ended a beam included, as transformers returns them)
    text: str
    cum_logprob: float
    finish_reason: str  # "stop" (EOS) or "length"


@dataclass
class BeamSearchOutput:
    sequences: list[BeamSearchSequence]  # best first


class LLM:
    def __init__(self, model: str = "smollm2-135m", **engine_options: object) -> None:
        self.engine = LLMEngine(EngineConfig.from_kwargs(model, **engine_options))

    def get_tokenizer(self):
        return self.engine.tokenizer

    def generate(self, prompts: PromptType | Sequence[PromptType],
                 sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
                 use_tqdm: bool = True, priority: Sequence[int] | None = None) -> list[RequestOutput]:
        """Run every prompt to completion in one continuous batch; outputs in input order.
        `priority` (vLLM's): one per prompt, lower served first; needs scheduling_policy="priority"."""
        if isinstance(prompts, (str, dict)) or (isinstance(prompts, list) and prompts
                                                 and isinstance(prompts[0], int)):
            prompts = [prompts]
        prompts = list(prompts)
        if sampling_params is None or isinstance(sampling_params, SamplingParams):
            params_list = [sampling_params or SamplingParams()] * len(prompts)
        else:
            params_list = list(sampling_params)
            if len(params_list) != len(prompts):
                raise ValueError(f"got {len(params_list)} sampling_params for {len(prompts)} prompts")
        if priority is None:
            priorities = [0] * len(prompts)
        elif isinstance(priority, (str, bytes)) or not isinstance(priority, Sequence):
            raise ValueError(f"priority must be a list of integers, one per prompt, got "
                             f"{type(priority).__name__}")
        else:
            priorities = list(priority)
            if len(priorities) != len(prompts):
                raise ValueError(f"priority has {len(priorities)} values for {len(prompts)} prompts")
        ids = []
        try:
            for prompt, params, prio in zip(prompts, params_list, priorities, strict=True):
                ids.append(self.engine.add_request(None, prompt, params, priority=prio))
        except Exception:
            self.engine.abort_request(ids)  # all or nothing: leave no half-added batch behind
            self.engine.step()
            raise
        return self._run(ids, use_tqdm)

    def chat(self, messages: list[Message] | list[list[Message]],
             sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
             use_tqdm: bool = True, add_generation_prompt: bool = True,
             tools: list[dict] | None = None) -> list[RequestOutput]:
        """Apply the model's chat template to one conversation or a list of them (with `tools`, OpenAI
        function definitions, shown as the template shows them), then generate. The reply is text:
        the server's tool_choice turns it into tool calls."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        prompts = [{"prompt_token_ids": self.apply_chat_template(c, add_generation_prompt, tools)}
                   for c in conversations]
        return self.generate(prompts, sampling_params, use_tqdm)

    def beam_search(self, prompts: PromptType | Sequence[PromptType], params: BeamSearchParams,
                    use_tqdm: bool = False) -> list[BeamSearchOutput]:
        """vLLM's offline beam search: each prompt's beams (tokens, text, cumulative logprob), best first.
        The search runs inside the engine core, its beams sharing KV blocks."""
        if isinstance(prompts, (str, dict)) or (isinstance(prompts, list) and prompts
                                                 and isinstance(prompts[0], int)):
            prompts = [prompts]
        ids = []
        try:
            for prompt in prompts:
                ids.append(self.engine.add_request(None, prompt, params))
        except Exception:
            self.engine.abort_request(ids)
            self.engine.step()
            raise
        results = self._run(ids, use_tqdm)
        return [BeamSearchOutput([BeamSearchSequence(c.token_ids, c.text, c.cumulative_logprob, c.finish_reason)
                                  for c in r.outputs]) for r in results]

    def embed(self, prompts: PromptType | Sequence[PromptType],
              pooling_params: PoolingParams | Sequence[PoolingParams] | None = None,
              use_tqdm: bool = True) -> list[EmbeddingRequestOutput]:
        """vLLM's `embed`: each prompt's pooled final hidden state (the engine's pooling_type, L2-normalized
        unless the params say otherwise), in input order. The prompts run through the same scheduler and
        KV cache as generation, prompt only."""
        if isinstance(prompts, (str, dict)) or (isinstance(prompts, list) and prompts
                                                 and isinstance(prompts[0], int)):
            prompts = [prompts]
        prompts = list(prompts)
        if pooling_params is None or isinstance(pooling_params, PoolingParams):
            params_list = [pooling_params or PoolingParams()] * len(prompts)
        else:
            params_list = list(pooling_params)
            if len(params_list) != len(prompts):
                raise ValueError(f"got {len(params_list)} pooling_params for {len(prompts)} prompts")
        ids = []
        try:
            for prompt, params in zip(prompts, params_list, strict=True):
                ids.append(self.engine.add_request(None, prompt, params))
        except Exception:
            self.engine.abort_request(ids)
            self.engine.step()
            raise
        return [EmbeddingRequestOutput.from_base(out) for out in self._run(ids, use_tqdm, "Embedding")]

    def reset_prefix_cache(self) -> bool:
        """Forget every cached prefix block (vLLM's name); False while requests still hold blocks."""
        return self.engine.reset_prefix_cache()

    def apply_chat_template(self, conversation: list[Message], add_generation_prompt: bool = True,
                            tools: list[dict] | None = None) -> list[int]:
        return self.engine.input_processor.apply_chat_template(conversation, add_generation_prompt, tools)

    def _run(self, ids: list[str], use_tqdm: bool, desc: str = "Generating") -> list[RequestOutput]:
        results: dict[str, RequestOutput] = {}
        wanted = set(ids)
        bar = tqdm(total=len(ids), desc=desc, unit="req", disable=not use_tqdm, dynamic_ncols=True)
        start = time.monotonic()
        generated = 0
        while len(results) < len(ids) and self.engine.has_unfinished_requests():
            for out in self.engine.step():
                generated += sum(len(c.token_ids_delta) for c in out.outputs)
                if out.finished and out.request_id in wanted:
                    results[out.request_id] = out
                    bar.update(1)
            elapsed = time.monotonic() - start
            if use_tqdm and elapsed > 0:
                bar.set_postfix_str(f"{generated / elapsed:.1f} tok/s", refresh=False)
        bar.close()
        return [results[i] for i in ids]
