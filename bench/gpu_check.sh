#!/usr/bin/env bash
# Every check that needs a GPU, in one go (the figures in bench/RESULTS.md come from it):
#   1. the CUDA tests (resident bf16/channels_last/fused defaults, no host sync per step, metrics
#      on the device) and the 1-GPU DDP check: torchrun --nproc-per-node 1 reaches the plain
#      run's accuracy on the quickstart
#   2. make bench's benchmark (BENCH_SCALE=full: CIFAR-sized epochs) against a hand-written
#      loop, the PyTorch tutorial's loop and Lightning
# Usage, from the repository root on a CUDA machine whose python3 has dltrain's dependencies:
#   bash bench/gpu_check.sh [OUTDIR]        (default bench/results/gpu)
set -uo pipefail
out=${1:-bench/results/gpu}
mkdir -p "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1

{
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    python3 -c "import torch; print('torch', torch.__version__, '·', torch.cuda.get_device_name())"
    nproc
} > "$out/machine.txt" 2>&1

timeout 170 python3 -m pytest -q -rs -p no:cacheprovider -k "not ddp" \
    tests/test_gpu.py tests/test_no_sync.py tests/test_metrics.py tests/test_ranking_metrics.py \
    > "$out/tests.txt" 2>&1
echo "tests: exit $?" >> "$out/tests.txt"
timeout 150 python3 -m pytest -q -s -p no:cacheprovider tests/test_gpu.py -k ddp \
    > "$out/ddp.txt" 2>&1
echo "ddp: exit $?" >> "$out/ddp.txt"

BENCH_JSON="$out/bench.json" timeout 240 python3 bench/run.py > "$out/bench.txt" 2>&1
echo "bench: exit $?" >> "$out/bench.txt"
