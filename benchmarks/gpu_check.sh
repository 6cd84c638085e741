#!/usr/bin/env bash
# The GPU checks in one go, sized for a short lease on one card:
#   1. the Triton kernel and CUDA-graph tests on CUDA (the same tests run on CPU in Triton's interpreter);
#   2. benchmarks/gpu_bench.py: parity with transformers on CUDA (float32 and bfloat16), decode attention
#      GB/s, the 64-request workload, the batch-1 decode step against
#      the memory floor, transformers `generate`, and the nano-vllm shape (256 sequences); the engine
#      figures with decode CUDA graphs and with enforce_eager.
# Models are random-weight and built on the machine (the SmolLM2 GGUF is too large to carry); only the
# tokenizer travels: TOKENIZER=DIR (made with save_pretrained).
#
#     OUT=gpu-results TOKENIZER=.gpu/tokenizer PY=python3 bash benchmarks/gpu_check.sh
set -u -o pipefail
OUT=${OUT:-gpu-results}
PY=${PY:-python3}
TOKENIZER=${TOKENIZER:-.gpu/tokenizer}
SECTIONS=${SECTIONS:-parity,batch1,workload64,attention,nano,transformers}
export PYTHONUNBUFFERED=1 TQDM_DISABLE=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PAGEDSERVE_CPU_KERNELS=0  # the CPU extension is not needed on a GPU run
mkdir -p "$OUT"
status=0

{
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1
    $PY -c "import torch, transformers, triton; print('torch', torch.__version__, 'transformers',
            transformers.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"
    nproc
} 2>&1 | tee "$OUT/machine.txt"

PAGEDSERVE_TEST_TOKENIZER="$TOKENIZER" timeout 180 $PY -m pytest -q -p no:cacheprovider tests/kernels/test_triton_attention.py tests/worker/test_cuda_graphs.py \
    2>&1 | tee "$OUT/kernels.log" \
    || status=1
timeout "${BENCH_TIMEOUT:-420}" $PY benchmarks/gpu_bench.py --tokenizer "$TOKENIZER" --out "$OUT" --sections "$SECTIONS" \
    2>&1 | tee "$OUT/bench.log" || status=1
exit $status
