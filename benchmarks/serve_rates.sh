#!/usr/bin/env bash
# The OpenAI server under streaming load at several Poisson request rates, measured by
# `pagedserve bench serve` (TTFT, inter-token latency, end-to-end percentiles, throughput).
# The same chapter workload (seeded) is replayed at each rate against one server on 127.0.0.1.
#
#   bash benchmarks/serve_rates.sh            # RATES="0.5 1 2 4" REQUESTS=32 SCALE=0.25 by default
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
RATES="${RATES:-0.5 1 2 4}"
REQUESTS="${REQUESTS:-32}"
SCALE="${SCALE:-0.25}"
MAX_SEQS="${MAX_SEQS:-16}"
OUT="${OUT:-bench-results/serve-rates}"
PORT="$($PY -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
mkdir -p "$OUT"

$PY -m pagedserve.entrypoints.cli serve --model smollm2-135m --host 127.0.0.1 --port "$PORT" \
    --max-num-seqs "$MAX_SEQS" --log-level warning &
SERVER=$!
trap 'kill -TERM $SERVER 2>/dev/null; wait $SERVER 2>/dev/null || true' EXIT
for _ in $(seq 120); do curl -sf -o /dev/null "http://127.0.0.1:$PORT/health" && break; sleep 1; done

for rate in $RATES; do
    $PY -m pagedserve.entrypoints.cli bench serve --url "http://127.0.0.1:$PORT" --label "pagedserve-rate$rate" \
        --workload chapter --requests "$REQUESTS" --rate "$rate" --max-tokens-scale "$SCALE" --seed 0 \
        --slo-ttft 2000 --slo-itl 250 --max-duration 900 --no-progress --out "$OUT/rate-$rate"
done
