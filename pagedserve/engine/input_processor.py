"""Input processing: a prompt (text, token ids, or a chat conversation) and SamplingParams become
the engine's request, validated once. `LLM`, `LLMEngine` and the OpenAI server all call this; the
core then trusts what it gets. Errors are ValueErrors naming the field (the server passes its wire
names, so a client's 400 names the field it sent)."""

from __future__ import annotations

import copy
from dataclasses import dataclass, replace

from pagedserve.engine.core_messages import EngineCoreRequest
from pagedserve.pooling_params import PoolingParams
from pagedserve.sampling_params import BeamSearchParams, SamplingParams

PromptType = str | list[int] | dict
Message = dict  # {"role", "content"} and, for tool turns, tool_calls / tool_call_id


class InputError(ValueError):
    """A refused input: the message, the field it names, and an OpenAI error code."""

    def __init__(self, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.param = param
        self.code = code


@dataclass
class EngineInput:
    """One validated request, before it is split into the core's sequences (n of them)."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams  # max_tokens filled in
    arrival_time: float
    eos_token_id: int | None
    cache_salt: str | None = None
    beam_search: BeamSearchParams | None = None  # then params only carry max_tokens (the length check)
    priority: int = 0  # lower is served first (--scheduling-policy priority); every sequence inherits it
    pooling_params: PoolingParams | None = None  # an embedding: then params are a placeholder (nothing is sampled)

    def core_requests(self) -> list[EngineCoreRequest]:
        """n > 1 becomes n sequences `id#i`, seeded seed + i; all but the first fork from the first's
        prompt blocks."""
        if self.pooling_params is not None:
            return [EngineCoreRequest(self.request_id, self.prompt_token_ids, self.params, self.eos_token_id,
                                      self.arrival_time, None, self.cache_salt, pooling_params=self.pooling_params,
                                      priority=self.priority)]
        if self.beam_search is not None:  # one core request: the core forks its beams
            return [EngineCoreRequest(self.request_id, self.prompt_token_ids, self.params, self.eos_token_id,
                                      self.arrival_time, None, self.cache_salt, beam_search=self.beam_search,
                                      priority=self.priority)]
        n = self.params.n
        ids = [self.request_id] if n == 1 else [f"{self.request_id}#{i}" for i in range(n)]
        return [EngineCoreRequest(rid, self.prompt_token_ids, self.params, self.eos_token_id, self.arrival_time,
                                  None if self.params.seed is None else self.params.seed + i, self.cache_salt,
                                  ids[0] if i else None, priority=self.priority)
                for i, rid in enumerate(ids)]


class InputProcessor:
    def __init__(self, tokenizer, vocab_size: int, max_model_len: int, capacity_tokens: int,
                 eos_token_id: int | None, model_name: str = "", scheduling_policy: str = "fcfs",
                 hidden_size: int | None = None) -> None:
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.max_model_len = max_model_len
        self.capacity_tokens = capacity_tokens
        self.eos_token_id = eos_token_id
        self.model_name = model_name
        self.scheduling_policy = scheduling_policy  # the engine's: may a request carry a priority
        self.hidden_size = hidden_size  # an embedding's length

    def copy_for_another_thread(self) -> InputProcessor:
        """The same processor with its own tokenizer, for a thread that tokenizes while another one
        decodes (a tokenizer that cannot be copied is shared: HF fast tokenizers are read-only here)."""
        try:
            tokenizer = copy.deepcopy(self.tokenizer)
        except Exception:
            tokenizer = self.tokenizer
        return InputProcessor(tokenizer, self.vocab_size, self.max_model_len, self.capacity_tokens,
                              self.eos_token_id, self.model_name, self.scheduling_policy, self.hidden_size)

    @property
    def limit(self) -> int:
        """Tokens one sequence may hold: the context length, or the whole KV cache if smaller."""
        return min(self.max_model_len, self.capacity_tokens)

    # --- prompts ---------------------------------------------------------------------------------

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=add_special_tokens))

    def check_token_ids(self, ids: list[int], field: str = "prompt_token_ids") -> None:
        if not ids:
            raise InputError(f"{field} must be a non-empty list", field)
        if not all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < self.vocab_size for t in ids):
            raise InputError(f"{field} must be integers in [0, {self.vocab_size})", field)

    def tokenize_prompt(self, prompt: PromptType) -> tuple[str | None, list[int]]:
        """A prompt string, a list of token ids, or {"prompt_token_ids": [...]} / {"prompt": "..."}."""
        if isinstance(prompt, dict):
            if "prompt_token_ids" in prompt:
                prompt = list(prompt["prompt_token_ids"])
            elif "prompt" in prompt:
                prompt = prompt["prompt"]
            else:
                raise InputError("prompt dict must have 'prompt' or 'prompt_token_ids'", "prompt")
        if isinstance(prompt, str):
            if not prompt:
                raise InputError("prompt must be a non-empty string", "prompt")
            return prompt, self.encode(prompt)
        if isinstance(prompt, (list, tuple)):
            self.check_token_ids(list(prompt))
            return None, list(prompt)
        raise InputError(f"prompt must be a string, a list of token ids or a dict, got {type(prompt).__name__}",
                         "prompt")

    def apply_chat_template(self, conversation: list[Message], add_generation_prompt: bool = True,
                            tools: list[dict] | None = None) -> list[int]:
        """The model's chat template over a conversation of {"role", "content"} messages, with the
        tools (OpenAI function definitions) shown the way the template shows them."""
        if not conversation:
            raise InputError("messages must be a non-empty list", "messages")
        if not self.tokenizer.chat_template:
            raise InputError(f"model {self.model_name!r} has no chat template", "messages")
        ids = self.tokenizer.apply_chat_template(conversation, add_generation_prompt=add_generation_prompt,
                                                 tokenize=True, tools=tools)
        if isinstance(ids, dict) or hasattr(ids, "input_ids"):  # newer transformers return a BatchEncoding
            ids = ids["input_ids"]
        return list(ids)

    # --- limits ----------------------------------------------------------------------------------

    def check_length(self, num_prompt: int, max_tokens: int | None, prompt_field: str = "prompt",
                     max_tokens_field: str = "max_tokens") -> None:
        limit = self.limit
        if num_prompt >= limit:
            raise InputError(f"{prompt_field} has {num_prompt} tokens; this model's context allows at most "
                             f"{limit - 1} prompt tokens (max_model_len={self.max_model_len}, KV capacity="
                             f"{self.capacity_tokens} tokens)", prompt_field, "context_length_exceeded")
        if max_tokens is not None and num_prompt + max_tokens > limit:
            raise InputError(f"{max_tokens_field}={max_tokens} plus the prompt's {num_prompt} tokens exceeds the "
                             f"context length of {limit} tokens (max_model_len={self.max_model_len}, KV capacity="
                             f"{self.capacity_tokens} tokens)", max_tokens_field, "context_length_exceeded")

    def check_priority(self, priority: int) -> None:
        if not isinstance(priority, int) or isinstance(priority, bool):
            raise InputError(f"priority must be an integer, got {priority!r}", "priority")
        if priority != 0 and self.scheduling_policy != "priority":  # as vLLM: not silently ignored
            raise InputError(f"priority must be 0 with --scheduling-policy {self.scheduling_policy} (got "
                             f"{priority}); request priorities need --scheduling-policy priority", "priority")

    # --- the request -----------------------------------------------------------------------------

    def process(self, request_id: str, prompt: PromptType, params: SamplingParams | None, arrival_time: float,
                prompt_field: str = "prompt", max_tokens_field: str = "max_tokens",
                priority: int = 0) -> EngineInput:
        params = params or SamplingParams()
        if not isinstance(params, SamplingParams):
            raise InputError("sampling_params must be a SamplingParams", "sampling_params")
        text, ids = self.tokenize_prompt(prompt)
        salt = prompt.get("cache_salt") if isinstance(prompt, dict) else None
        return self.process_tokens(request_id, text, ids, params, arrival_time, prompt_field, max_tokens_field,
                                   cache_salt=salt, priority=priority)

    def process_beam_search(self, request_id: str, prompt: PromptType, params: BeamSearchParams,
                            arrival_time: float, priority: int = 0) -> EngineInput:
        """A beam search request: the same prompt checks, and beams that must fit the cache together."""
        if not isinstance(params, BeamSearchParams):
            raise InputError("params must be a BeamSearchParams", "params")
        # The prompt and length checks of any request; the sampling side only carries max_tokens.
        sampling = SamplingParams(temperature=0.0, max_tokens=params.max_tokens, ignore_eos=True)
        inp = self.process(request_id, prompt, sampling, arrival_time, priority=priority)
        need = len(inp.prompt_token_ids) + params.beam_width * (params.max_tokens + 1)
        if need > self.capacity_tokens:
            raise InputError(f"beam_width={params.beam_width} beams of up to {params.max_tokens} tokens after a "
                             f"{len(inp.prompt_token_ids)}-token prompt need {need} KV slots; the cache holds "
                             f"{self.capacity_tokens}", "beam_width")
        inp.beam_search = params
        return inp

    def process_pooling(self, request_id: str, prompt: PromptType, params: PoolingParams | None,
                        arrival_time: float, prompt_field: str = "prompt", priority: int = 0) -> EngineInput:
        """An embedding request: the prompt checks of any request, its own limits."""
        params = params or PoolingParams()
        if not isinstance(params, PoolingParams):
            raise InputError("pooling_params must be a PoolingParams", "pooling_params")
        text, ids = self.tokenize_prompt(prompt)
        salt = prompt.get("cache_salt") if isinstance(prompt, dict) else None
        return self.process_pooling_tokens(request_id, text, ids, params, arrival_time, prompt_field, salt, priority)

    def process_pooling_tokens(self, request_id: str, text: str | None, ids: list[int], params: PoolingParams,
                               arrival_time: float, prompt_field: str = "prompt",
                               cache_salt: str | None = None, priority: int = 0) -> EngineInput:
        """For token ids the caller has already checked. Nothing is generated, so the prompt may fill
        the whole context."""
        self.check_priority(priority)
        limit = self.limit
        if params.dimensions is not None and self.hidden_size is not None and params.dimensions != self.hidden_size:
            raise InputError(f"dimensions must be this model's hidden size ({self.hidden_size}), got "
                             f"{params.dimensions}: it has no Matryoshka training to shorten its embeddings",
                             "dimensions")
        keep = params.truncate_prompt_tokens
        if keep is not None:
            if keep > limit:
                raise InputError(f"truncate_prompt_tokens={keep} exceeds the context length of {limit} tokens",
                                 "truncate_prompt_tokens")
            ids = ids[-(limit if keep == -1 else keep):]  # vLLM's left truncation: the last tokens stay
        if len(ids) > limit:
            raise InputError(f"{prompt_field} has {len(ids)} tokens; this model's context allows at most {limit} "
                             f"(max_model_len={self.max_model_len}, KV capacity={self.capacity_tokens} tokens)",
                             prompt_field, "context_length_exceeded")
        if cache_salt is not None and (not isinstance(cache_salt, str) or not cache_salt):
            raise InputError("cache_salt must be a non-empty string", "cache_salt")
        # A placeholder for the parts of the core that read sampling params; nothing is sampled.
        placeholder = SamplingParams(temperature=0.0, max_tokens=1)
        return EngineInput(request_id, text, list(ids), placeholder, arrival_time, self.eos_token_id, cache_salt,
                           pooling_params=params, priority=priority)

    def process_tokens(self, request_id: str, text: str | None, ids: list[int], params: SamplingParams,
                       arrival_time: float, prompt_field: str = "prompt",
                       max_tokens_field: str = "max_tokens", cache_salt: str | None = None,
                       priority: int = 0) -> EngineInput:
        """For token ids the caller has already checked (the server's own tokenization)."""
        self.check_priority(priority)
        self.check_length(len(ids), params.max_tokens, prompt_field, max_tokens_field)
        if cache_salt is not None and (not isinstance(cache_salt, str) or not cache_salt):
            raise InputError("cache_salt must be a non-empty string", "cache_salt")
        if params.logit_bias and max(params.logit_bias) >= self.vocab_size:
            raise InputError(f"logit_bias keys must be token ids in [0, {self.vocab_size}), got "
                             f"{max(params.logit_bias)}", "logit_bias")
        if params.max_tokens is None:  # as much as fits
            params = replace(params, max_tokens=self.limit - len(ids))
        if params.n > 1 and len(ids) + params.n * params.max_tokens > self.capacity_tokens:
            raise InputError(f"n={params.n} sequences of up to {params.max_tokens} tokens after a shared "
                             f"{len(ids)}-token prompt need {len(ids) + params.n * params.max_tokens} KV slots; "
                             f"the cache holds {self.capacity_tokens}", "n")
        return EngineInput(request_id, text, list(ids), params, arrival_time, self.eos_token_id, cache_salt,
                           priority=priority)
