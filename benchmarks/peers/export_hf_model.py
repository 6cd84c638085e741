"""Write the default GGUF model as a Hugging Face folder (config.json + safetensors + tokenizer), for
peers that only load HF folders (vLLM). Runs in the project's venv; the weights are the GGUF's,
de-quantized to float32 by transformers — the same numbers pagedserve and llama.cpp compute with.

    .venv/bin/python benchmarks/peers/export_hf_model.py --out benchmarks/peers/.work/models/smollm2-135m-hf
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from pagedserve.model.loader import load_tokenizer, resolve_model_path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m", help="known name or GGUF file")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    path = resolve_model_path(args.model)
    out = Path(args.out)
    if (out / "config.json").is_file():
        print(f"already there: {out}")
        return
    if path.suffix == ".gguf":
        loaded = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    else:
        loaded = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)
    # transformers refuses to save a model it loaded from GGUF ("not serializable"); the tensors are plain
    # float32 after de-quantization, so copy them into a fresh model of the same config and save that.
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = type(loaded)(config).to(torch.float32)
    model.load_state_dict(loaded.state_dict())
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out), safe_serialization=True)
    load_tokenizer(path).save_pretrained(str(out))
    _add_legacy_keys(out / "config.json")
    print(f"wrote {out}")


def _add_legacy_keys(config_path: Path) -> None:
    """transformers 5 writes rope_parameters/dtype; a peer pinned to transformers 4.x reads rope_theta and
    torch_dtype, and would silently fall back to the default RoPE base without them."""
    cfg = json.loads(config_path.read_text())
    rope = cfg.get("rope_parameters") or {}
    if "rope_theta" not in cfg and "rope_theta" in rope:
        cfg["rope_theta"] = rope["rope_theta"]
    if "torch_dtype" not in cfg and "dtype" in cfg:
        cfg["torch_dtype"] = cfg["dtype"]
    config_path.write_text(json.dumps(cfg, indent=2) + "\n")


if __name__ == "__main__":
    main()
