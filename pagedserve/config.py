"""Engine configuration: plain dataclasses, validated once at construction."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch

from pagedserve.pooling_params import POOLING_TYPES
from pagedserve.spec_decode.config import SpeculativeConfig

QUANTIZATION_METHODS = ("int8", "w8a8", "gguf")  # pagedserve/model/quantization
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
POLICIES = ("continuous", "static")
SCHEDULING_POLICIES = ("fcfs", "priority")  # vLLM's --scheduling-policy: the waiting queue's order
# The KV cache's element type; "auto" is the model's dtype. fp8 would need scaled 8-bit kernels.
KV_CACHE_DTYPES = ("auto", "float16", "bfloat16")
_FP8_KV_CACHE_DTYPES = ("fp8", "fp8_e4m3", "fp8_e5m2")


def _require(ok: bool, field_name: str, allowed: str, value: object) -> None:
    if not ok:
        raise ValueError(f"{field_name} must be {allowed}, got {value!r}")


def env_flag(name: str, default: bool = True) -> bool:
    """A boolean switch's default from the environment ("0" turns it off), read when a config is made."""
    value = os.environ.get(name)
    return default if value is None else value != "0"


def option(help: str, **kwargs: object) -> dict[str, object]:
    """Field metadata the CLI reads: its help text (and choices); one declaration for both."""
    return {"help": help, **kwargs}


@dataclass
class CacheConfig:
    """Paged KV cache: fixed-size blocks pre-allocated from a memory budget."""

    block_size: int = field(default=16, metadata=option("tokens per KV block"))
    kv_cache_memory_gb: float = field(default=1.0, metadata=option("memory for the KV cache, GiB"))
    # Overrides the memory budget with an exact block count (tests use it to force preemption).
    num_blocks: int | None = field(default=None, metadata=option("exact KV block count (overrides the budget)"))
    enable_prefix_caching: bool = field(default=True, metadata=option(
        "reuse the KV blocks of a prompt prefix computed before (automatic prefix caching)"))
    kv_cache_dtype: str = field(default="auto", metadata=option(
        "KV cache element type: auto (the model's dtype), float16 or bfloat16 (half the memory per block; "
        "attention still computes in the model's dtype)", choices=KV_CACHE_DTYPES))

    def __post_init__(self) -> None:
        _require(isinstance(self.block_size, int) and 1 <= self.block_size <= 256,
                 "block_size", "an integer in [1, 256]", self.block_size)
        _require(self.kv_cache_memory_gb > 0, "kv_cache_memory_gb", "> 0", self.kv_cache_memory_gb)
        _require(self.num_blocks is None or self.num_blocks >= 1, "num_blocks", ">= 1 or None", self.num_blocks)
        fp8 = " (fp8 is not supported by this engine's CPU backends)" if self.kv_cache_dtype in _FP8_KV_CACHE_DTYPES else ""
        _require(self.kv_cache_dtype in KV_CACHE_DTYPES, "kv_cache_dtype", f"one of {KV_CACHE_DTYPES}{fp8}",
                 self.kv_cache_dtype)


@dataclass
class SchedulerConfig:
    """Iteration-level scheduling limits, the batching policy and the waiting queue's order."""

    policy: str = field(default="continuous", metadata=option("batching policy", choices=POLICIES))
    # vLLM's option name. "priority": requests' `priority` (lower first), then arrival, orders the
    # waiting queue and picks preemption victims; a better-priority arrival may preempt a running one.
    scheduling_policy: str = field(default="fcfs", metadata=option(
        "waiting-queue order: fcfs (arrival) or priority (each request's priority, lower first, then arrival)",
        choices=SCHEDULING_POLICIES))
    max_num_seqs: int = field(default=64, metadata=option("sequences in the running batch at most"))
    max_num_batched_tokens: int = field(default=2048, metadata=option("tokens per step at most"))
    enable_chunked_prefill: bool = field(default=True, metadata=option("split long prompts over steps"))

    def __post_init__(self) -> None:
        _require(self.policy in POLICIES, "policy", f"one of {POLICIES}", self.policy)
        _require(self.scheduling_policy in SCHEDULING_POLICIES, "scheduling_policy",
                 f"one of {SCHEDULING_POLICIES}", self.scheduling_policy)
        # A static batch is admitted whole and never preempted: there is nothing to reorder.
        _require(self.scheduling_policy == "fcfs" or self.policy == "continuous", "scheduling_policy",
                 f"'fcfs' with policy {self.policy!r} (priority scheduling needs the continuous policy)",
                 self.scheduling_policy)
        _require(self.max_num_seqs >= 1, "max_num_seqs", ">= 1", self.max_num_seqs)
        _require(self.max_num_batched_tokens >= 1, "max_num_batched_tokens", ">= 1", self.max_num_batched_tokens)


@dataclass
class EngineConfig:
    """Everything the engine needs; the model is a name, an HF folder or a GGUF file."""

    model: str = "smollm2-135m"
    # vLLM's "auto": bfloat16 on CUDA (tensor cores, half the bytes per step), float32 on CPU (the fused
    # CPU kernels and the quantized matmuls are float32).
    dtype: str = field(default="auto", metadata=option(
        "weights and activations (auto: bfloat16 on cuda, float32 on cpu)", choices=("auto", *_DTYPES)))
    device: str = field(default="cpu", metadata=option("cpu or cuda[:N]"))
    max_model_len: int | None = field(default=None, metadata=option("context length (default: the model's)"))
    # Not a flag: --seed is the sampling seed of `generate` and `chat`.
    seed: int = field(default=0, metadata=option("global seed (unseeded requests draw from it)", cli=False))
    num_threads: int | None = field(default=None, metadata=option("PyTorch intra-op threads"))
    # Fast-path switches, for A/B runs and profiling; the environment sets their defaults.
    cpu_kernels: bool = field(default_factory=lambda: env_flag("PAGEDSERVE_CPU_KERNELS"), metadata=option(
        "fused CPU kernels in float32 on CPU (default: $PAGEDSERVE_CPU_KERNELS != 0)"))
    decoder_stack: bool = field(default_factory=lambda: env_flag("PAGEDSERVE_DECODER_STACK"), metadata=option(
        "run every layer of a step in one C++ call (default: $PAGEDSERVE_DECODER_STACK != 0)"))
    quantized_matmul: bool = field(default_factory=lambda: env_flag("PAGEDSERVE_QUANT_MATMUL"), metadata=option(
        "read a GGUF's Q4_1/Q8_0 blocks directly in small matmuls (default: $PAGEDSERVE_QUANT_MATMUL != 0)"))
    # vLLM's option name; None keeps the checkpoint's own weights (a GGUF's blocks, or float).
    quantization: str | None = field(default=None, metadata=option(
        "quantize float weights at load: int8 (int8 weights, float32 activations) or w8a8 (int8 weights "
        "and activations); gguf = the GGUF file's own blocks (what a GGUF gets anyway)",
        choices=QUANTIZATION_METHODS))
    # A SpeculativeConfig, or its dict / JSON text (vLLM's `speculative_config`); None: no speculation.
    speculative_config: SpeculativeConfig | None = field(default=None, metadata=option(
        "speculative decoding as JSON, e.g. '{\"method\": \"ngram\", \"num_speculative_tokens\": 4}' "
        "(methods: ngram, draft_model, layer_skip)", parse=SpeculativeConfig.parse))
    # vLLM's default pooler for a causal LM run with --task embed: LAST + normalize. In a causal model
    # only the last token has attended to the whole prompt (last-token embedding models, e5-mistral
    # or gte-Qwen2, are trained so), and it lets embeddings take prefix-cache hits; MEAN cannot.
    pooling_type: str = field(default="LAST", metadata=option(
        "how embeddings pool the final hidden states: LAST (the last prompt token's, vLLM's default for "
        "a causal LM) or MEAN (over every prompt token)", choices=POOLING_TYPES))
    # One OpenTelemetry-shaped span tree per finished request, as JSON lines (engine/request_trace.py).
    trace_file: str | None = field(default=None, metadata=option(
        "write each finished request's trace (queued, prefill chunks, decode, preemptions, cache hits) as "
        "one OTLP/JSON line to this file"))
    # vLLM's option name: on CUDA, decode steps replay CUDA graphs captured at start unless this is set.
    enforce_eager: bool = field(default=False, metadata=option(
        "never capture CUDA graphs: every step runs eagerly (CUDA only; the CPU always does)"))
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)

    def __post_init__(self) -> None:
        self.speculative_config = SpeculativeConfig.parse(self.speculative_config)
        if self.speculative_config is not None:
            _require(self.scheduler.policy == "continuous", "policy",
                     "'continuous' with speculative_config (the static baseline reserves no draft slots)",
                     self.scheduler.policy)
        _require(self.pooling_type in POOLING_TYPES, "pooling_type", f"one of {POOLING_TYPES}", self.pooling_type)
        _require(self.dtype == "auto" or self.dtype in _DTYPES, "dtype", f"one of {('auto', *_DTYPES)}", self.dtype)
        _require(self.quantization is None or self.quantization in QUANTIZATION_METHODS, "quantization",
                 f"None or one of {QUANTIZATION_METHODS}", self.quantization)
        if self.quantization in ("int8", "w8a8"):
            _require(self.device == "cpu" and self.torch_dtype == torch.float32, "quantization",
                     f"used with device 'cpu' and dtype 'float32' ({self.quantization!r} runs on the CPU kernels)",
                     self.quantization)
        _require(self.device == "cpu" or self.device.startswith("cuda"), "device", "'cpu' or 'cuda[:N]'", self.device)
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise ValueError("device is 'cuda' but torch.cuda.is_available() is False")
        _require(self.max_model_len is None or self.max_model_len >= 1, "max_model_len", ">= 1 or None",
                 self.max_model_len)

    @property
    def torch_dtype(self) -> torch.dtype:
        if self.dtype == "auto":
            return torch.bfloat16 if self.device.startswith("cuda") else torch.float32
        return _DTYPES[self.dtype]

    @property
    def kv_cache_torch_dtype(self) -> torch.dtype:
        """The KV cache's element type: cache.kv_cache_dtype, or the model's dtype for "auto"."""
        kv = self.cache.kv_cache_dtype
        return self.torch_dtype if kv == "auto" else _DTYPES[kv]

    @classmethod
    def from_kwargs(cls, model: str = "smollm2-135m", **kwargs: object) -> EngineConfig:
        """Flat keyword options (as `LLM(...)` and the CLI take them) → nested config."""
        cache_keys = CacheConfig.__dataclass_fields__.keys()
        sched_keys = SchedulerConfig.__dataclass_fields__.keys()
        engine_keys = set(cls.__dataclass_fields__) - {"cache", "scheduler", "model"}
        unknown = set(kwargs) - set(cache_keys) - set(sched_keys) - engine_keys
        if unknown:
            raise TypeError(f"unknown engine option(s): {sorted(unknown)}")
        cache = CacheConfig(**{k: v for k, v in kwargs.items() if k in cache_keys})
        sched = SchedulerConfig(**{k: v for k, v in kwargs.items() if k in sched_keys})
        rest = {k: v for k, v in kwargs.items() if k in engine_keys}
        return cls(model=model, cache=cache, scheduler=sched, **rest)
