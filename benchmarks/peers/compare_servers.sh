#!/usr/bin/env bash
# Measure OpenAI-compatible servers with one harness and one workload: pagedserve's own server,
# llama.cpp's llama-server and vLLM (CPU). Each server is started in turn on 127.0.0.1, given the
# identical workload file by `pagedserve bench serve`, and stopped; then one combined report is written.
#
#   bash benchmarks/peers/compare_servers.sh
#   SERVERS="pagedserve llama-server" REQUESTS=32 RATE=1 SCALE=0.25 bash benchmarks/peers/compare_servers.sh
#   PAGEDSERVE_ARGS="--model HF_DIR --quantization w8a8" GGUF=model.Q8_0.gguf MAX_SEQS=64 bash ...compare_servers.sh
#
# Needs setup_llama_cpp.sh / setup_vllm_cpu.sh to have run for those servers (a missing peer is skipped
# with a message). Results: $OUT/<server>/ (one report each) and $OUT/compare/report.md (all of them).
set -euo pipefail
source "$(dirname "$0")/common.sh"

SERVERS="${SERVERS:-pagedserve llama-server vllm}"
REQUESTS="${REQUESTS:-64}"
RATE="${RATE:-2}"                    # Poisson arrivals, requests/s ("inf" = all at once)
SCALE="${SCALE:-0.25}"               # output lengths scaled from the chapter's ranges
SEED="${SEED:-0}"
READY_TIMEOUT="${READY_TIMEOUT:-900}" # vLLM's start-up on 2 cores takes minutes
MAX_DURATION="${MAX_DURATION:-1800}"
SLO_ARGS=(${SLO_ARGS:---slo-ttft 2000 --slo-itl 250})
OUT="${OUT:-$ROOT/bench-results/servers-$(date +%Y%m%d-%H%M%S)}"
BENCH=("$PROJECT_PY" -m pagedserve.entrypoints.cli bench)
mkdir -p "$OUT"

# One workload file for every server.
"${BENCH[@]}" workload --workload chapter --requests "$REQUESTS" --rate "$RATE" --max-tokens-scale "$SCALE" \
    --seed "$SEED" --out "$OUT/workload.jsonl"

trap stop_server EXIT INT TERM  # stop_server: common.sh

measured=()
for server in $SERVERS; do
    port="$(free_port)"
    case "$server" in
        pagedserve)
            cmd=("$PROJECT_PY" -m pagedserve.entrypoints.cli serve --model "$MODEL_NAME" --host 127.0.0.1
                 --port "$port" --max-num-seqs "$MAX_SEQS" --log-level warning ${PAGEDSERVE_ARGS:-}) ;;
        llama-server)
            [[ -x "$LLAMA_SERVER_BIN" ]] || { echo "skip llama-server: run setup_llama_cpp.sh first" >&2; continue; }
            cmd=(env PORT="$port" bash "$PEERS_DIR/start_llama_server.sh") ;;
        vllm)
            [[ -x "$VLLM_PY" ]] || { echo "skip vllm: run setup_vllm_cpu.sh first" >&2; continue; }
            cmd=(env PORT="$port" bash "$PEERS_DIR/start_vllm.sh") ;;
        *) echo "unknown server '$server' (pagedserve, llama-server, vllm)" >&2; exit 2 ;;
    esac
    url="http://127.0.0.1:$port"
    echo "== $server on $url"
    # setsid: the server leads its own process group, so stop_server can end all of it and nothing else.
    setsid "${cmd[@]}" >"$OUT/$server.log" 2>&1 &
    SERVER_PID=$!
    if ! wait_for_server "$url" "$READY_TIMEOUT" "$SERVER_PID"; then
        echo "skip $server: not ready (log: $OUT/$server.log)" >&2
        stop_server
        continue
    fi
    "${BENCH[@]}" serve --url "$url" --workload "$OUT/workload.jsonl" --label "$server" \
        --max-duration "$MAX_DURATION" "${SLO_ARGS[@]}" --out "$OUT/$server" || echo "$server: bench reported errors" >&2
    stop_server
    measured+=("$OUT/$server")
done

if (( ${#measured[@]} )); then
    "${BENCH[@]}" report --inputs "${measured[@]}" --target pagedserve "${SLO_ARGS[@]}" --out "$OUT/compare"
    echo "combined report: $OUT/compare/report.md"
fi
