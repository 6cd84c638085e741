"""OpenAI request fields this server cannot honour: each is accepted only with its no-op value and
otherwise refused with a 400 that names it and says why. Fields outside OpenAI's schema and vLLM's
extensions never get this far: the request models forbid them."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel

from pagedserve.entrypoints.openai.errors import bad_request

# field → (values that change nothing, why anything else is refused)
CHAT_UNSUPPORTED: dict[str, tuple[tuple[Any, ...], str]] = {
    "audio": ((None,), "audio output is not supported: these models write text"),
    "modalities": ((None, ["text"]), 'only text output is supported: give ["text"] or leave it out'),
    "function_call": ((None,), "the deprecated function_call is not supported: use tool_choice"),
    "functions": ((None,), "the deprecated functions is not supported: use tools"),
    "store": ((None, False), "this server does not store completions"),
    "metadata": ((None, {}), "metadata is kept with stored completions, and this server does not store them"),
    "moderation": ((None,), "moderation is not supported"),
    "prediction": ((None,), "predicted outputs are not supported (see the speculative decoding options)"),
    "prompt_cache_key": ((None,), "prompt_cache_key is not supported: every prompt prefix is cached automatically "
                                  "(cache_salt keeps tenants apart)"),
    "prompt_cache_options": ((None,), "prompt_cache_options is not supported: prefix caching is automatic"),
    "prompt_cache_retention": ((None,), "prompt_cache_retention is not supported: cached blocks live until "
                                        "evicted (LRU)"),
    "reasoning_effort": ((None,), "this model has no reasoning mode"),
    "verbosity": ((None,), "verbosity is not supported: use max_tokens"),
    "service_tier": ((None, "auto", "default"), "this server has one service tier: 'auto' or 'default'"),
    "web_search_options": ((None,), "web search is not supported"),
}

STREAM_OPTIONS_UNSUPPORTED: dict[str, tuple[tuple[Any, ...], str]] = {
    "include_obfuscation": ((None, False), "stream obfuscation is not supported"),
}

MESSAGE_UNSUPPORTED: dict[str, tuple[tuple[Any, ...], str]] = {
    "refusal": ((None,), "refusal content is not supported in the history"),
    "audio": ((None,), "audio in the history is not supported"),
    "function_call": ((None,), "the deprecated function_call is not supported: send tool_calls"),
    "annotations": ((None, []), "annotations are not supported in the history"),
}


def check_unsupported(model: BaseModel, table: dict[str, tuple[tuple[Any, ...], str]], prefix: str = "") -> None:
    """400 for the first field of `table` the client set to something other than a no-op value."""
    for name in model.model_fields_set & table.keys():
        allowed, why = table[name]
        value = getattr(model, name)
        if not any(value == a and type(value) is type(a) for a in allowed):
            raise bad_request(f"{prefix}{name}: {why}", f"{prefix}{name}")
