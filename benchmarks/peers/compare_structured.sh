#!/usr/bin/env bash
# Structured outputs on vs off over HTTP, pagedserve's server and vLLM (CPU, xgrammar), one after the
# other on 127.0.0.1 with the same workload (structured_http.py) and the same seats.
#
#   MAX_SEQS=64 bash benchmarks/peers/compare_structured.sh
#   SERVERS=pagedserve RUNS=3 MAX_SEQS=64 bash benchmarks/peers/compare_structured.sh
#   VLLM_ARGS='--structured-outputs-config {"backend":"xgrammar","disable_any_whitespace":true}' ...   (compact JSON, as pagedserve writes it)
set -euo pipefail
source "$(dirname "$0")/common.sh"

SERVERS="${SERVERS:-pagedserve vllm}"
RUNS="${RUNS:-2}"
READY_TIMEOUT="${READY_TIMEOUT:-900}"
OUT="${OUT:-$ROOT/bench-results/structured-$(date +%Y%m%d-%H%M%S)}"
mkdir -p "$OUT"

trap stop_server EXIT INT TERM  # stop_server: common.sh

for server in $SERVERS; do
    port="$(free_port)"
    case "$server" in
        pagedserve)
            cmd=("$PROJECT_PY" -m pagedserve.entrypoints.cli serve --model "$MODEL_NAME" --host 127.0.0.1
                 --port "$port" --max-num-seqs "$MAX_SEQS" --log-level warning ${PAGEDSERVE_ARGS:-}) ;;
        vllm)
            [[ -x "$VLLM_PY" ]] || { echo "skip vllm: run setup_vllm_cpu.sh first" >&2; continue; }
            cmd=(env PORT="$port" bash "$PEERS_DIR/start_vllm.sh" ${VLLM_ARGS:-}) ;;
        *) echo "unknown server '$server' (pagedserve, vllm)" >&2; exit 2 ;;
    esac
    url="http://127.0.0.1:$port"
    echo "== $server on $url"
    setsid "${cmd[@]}" >"$OUT/$server.log" 2>&1 &
    SERVER_PID=$!
    if ! wait_for_server "$url" "$READY_TIMEOUT" "$SERVER_PID"; then
        echo "skip $server: not ready (log: $OUT/$server.log)" >&2
        stop_server
        continue
    fi
    "$PROJECT_PY" "$PEERS_DIR/structured_http.py" --url "$url" --model "$MODEL_NAME" --runs "$RUNS" \
        --label "$server" | tee -a "$OUT/results.txt" || echo "$server: failed" >&2
    stop_server
done
echo "results: $OUT/results.txt"
