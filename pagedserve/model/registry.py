"""Architecture name (config.json `architectures`) → model class. Anything else is refused by name."""

from __future__ import annotations

from torch import nn

from pagedserve.model.llama import LlamaForCausalLM

# Mistral and Qwen2 are Llama-shaped decoders; their differences (q/k/v bias) live in ModelConfig.
_REGISTRY: dict[str, type[nn.Module]] = {
    "LlamaForCausalLM": LlamaForCausalLM,
    "MistralForCausalLM": LlamaForCausalLM,
    "Qwen2ForCausalLM": LlamaForCausalLM,
}


def supported_architectures() -> list[str]:
    return sorted(_REGISTRY)


def model_class_for(architecture: str) -> type[nn.Module]:
    try:
        return _REGISTRY[architecture]
    except KeyError:
        raise ValueError(f"architecture {architecture!r} is not supported; supported: "
                         f"{supported_architectures()}") from None
