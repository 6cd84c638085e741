"""Engine configuration: plain dataclasses, validated once at construction."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
POLICIES = ("continuous", "static")


def _require(ok: bool, field_name: str, allowed: str, value: object) -> None:
    if not ok:
        raise ValueError(f"{field_name} must be {allowed}, got {value!r}")


@dataclass
class CacheConfig:
    """Paged KV cache: fixed-size blocks pre-allocated from a memory budget."""

    block_size: int = 16
    kv_cache_memory_gb: float = 1.0
    # Overrides the memory budget with an exact block count (tests use it to force preemption).
    num_blocks: int | None = None

    def __post_init__(self) -> None:
        _require(isinstance(self.block_size, int) and 1 <= self.block_size <= 256,
                 "block_size", "an integer in [1, 256]", self.block_size)
        _require(self.kv_cache_memory_gb > 0, "kv_cache_memory_gb", "> 0", self.kv_cache_memory_gb)
        _require(self.num_blocks is None or self.num_blocks >= 1, "num_blocks", ">= 1 or None", self.num_blocks)


@dataclass
class SchedulerConfig:
    """Iteration-level scheduling limits and the batching policy."""

    policy: str = "continuous"
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    enable_chunked_prefill: bool = True

    def __post_init__(self) -> None:
        _require(self.policy in POLICIES, "policy", f"one of {POLICIES}", self.policy)
        _require(self.max_num_seqs >= 1, "max_num_seqs", ">= 1", self.max_num_seqs)
        _require(self.max_num_batched_tokens >= 1, "max_num_batched_tokens", ">= 1", self.max_num_batched_tokens)


@dataclass
class EngineConfig:
    """Everything the engine needs; the model is a name, an HF folder or a GGUF file."""

    model: str = "smollm2-135m"
    dtype: str = "float32"
    device: str = "cpu"
    max_model_len: int | None = None
    seed: int = 0
    num_threads: int | None = None
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)

    def __post_init__(self) -> None:
        _require(self.dtype in _DTYPES, "dtype", f"one of {tuple(_DTYPES)}", self.dtype)
        _require(self.device == "cpu" or self.device.startswith("cuda"), "device", "'cpu' or 'cuda[:N]'", self.device)
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise ValueError("device is 'cuda' but torch.cuda.is_available() is False")
        _require(self.max_model_len is None or self.max_model_len >= 1, "max_model_len", ">= 1 or None",
                 self.max_model_len)

    @property
    def torch_dtype(self) -> torch.dtype:
        return _DTYPES[self.dtype]

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
