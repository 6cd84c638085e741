#!/usr/bin/env bash
# Run llama.cpp's llama-server on the same SmolLM2 GGUF that pagedserve serves, on 127.0.0.1 only:
# 16 parallel slots with continuous batching, 2 threads (the machine's cores), a context big enough
# that each slot holds the longest chapter request (~300 prompt + 800 output tokens).
#
#   PORT=8081 bash benchmarks/peers/start_llama_server.sh      (after setup_llama_cpp.sh)
set -euo pipefail
source "$(dirname "$0")/common.sh"

[[ -x "$LLAMA_SERVER_BIN" ]] || { echo "not built yet: run benchmarks/peers/setup_llama_cpp.sh" >&2; exit 1; }
PORT="${PORT:-8081}"
CTX="${CTX:-$((MAX_SEQS * 1280))}"  # split evenly over the slots: 1280 tokens each
exec "$LLAMA_SERVER_BIN" \
    -m "$(model_gguf)" \
    --alias "$MODEL_NAME" \
    --host 127.0.0.1 --port "$PORT" \
    -np "$MAX_SEQS" -cb -t "$THREADS" -c "$CTX" \
    --no-webui \
    "$@"
