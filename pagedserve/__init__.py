"""pagedserve: a readable LLM inference engine with a paged KV cache and continuous batching."""

from pagedserve.config import CacheConfig, EngineConfig, SchedulerConfig
from pagedserve.outputs import (
    CompletionOutput,
    EmbeddingOutput,
    EmbeddingRequestOutput,
    Logprob,
    RequestMetrics,
    RequestOutput,
)
from pagedserve.pooling_params import PoolingParams
from pagedserve.sampling_params import BeamSearchParams, SamplingParams
from pagedserve.structured_output.params import StructuredOutputsParams

__version__ = "0.1.0"


def __getattr__(name: str):
    # LLM and LLMEngine pull in torch models and transformers; import them on first use.
    if name == "LLM":
        from pagedserve.entrypoints.llm import LLM

        return LLM
    if name == "LLMEngine":
        from pagedserve.engine.llm_engine import LLMEngine

        return LLMEngine
    raise AttributeError(name)


__all__ = ["LLM", "LLMEngine", "SamplingParams", "BeamSearchParams", "StructuredOutputsParams", "PoolingParams",
           "EngineConfig", "CacheConfig", "SchedulerConfig", "RequestOutput", "CompletionOutput", "RequestMetrics",
           "Logprob", "EmbeddingRequestOutput", "EmbeddingOutput", "__version__"]
