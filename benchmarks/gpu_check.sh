#!/usr/bin/env bash
# The one script a GPU session runs (step limits add up to 9.5 minutes on one H100/H200;
# call it with timeout_s=600 and keep the rest of the 15-minute budget for one rerun):
#   OUT=/some/dir bash benchmarks/gpu_check.sh
# Installs the project, runs the GPU-marked tests with JAX_PLATFORMS=cuda, runs the GPU
# benchmarks, and leaves everything under $OUT (default benchmarks/results): one log,
# gpu_check.log, plus each benchmark's own JSON and markdown. The device tool returns at
# most 8 files from $OUT, so append new steps to the same log rather than new log files.
# A failing step is recorded and the script goes on; the exit status is 1 if any failed.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-benchmarks/results}"
mkdir -p "$OUT"
LOG="$OUT/gpu_check.log"
PY="${PYTHON:-python3}"
export PYTHONUNBUFFERED=1
status=0

step() {  # step NAME TIMEOUT_S CMD...: run, log, time, record failure
  local name=$1 limit=$2 start=$SECONDS rc
  shift 2
  echo "== $name: $*" | tee -a "$LOG"
  timeout "$limit" "$@" 2>&1 | tee -a "$LOG"
  rc=${PIPESTATUS[0]}
  echo "== $name: rc=$rc after $((SECONDS - start)) s" | tee -a "$LOG"
  [ "$rc" -eq 0 ] || status=1
}

step install 60 "$PY" -m pip install -q --no-deps --no-build-isolation -e .
export JAX_PLATFORMS=cuda
step devices 60 "$PY" -c "import jax; print('jax', jax.__version__, jax.devices())"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 | tee -a "$LOG"

# Kernel tests on the compiled GPU path (skipped on CPU).
step gpu_tests 120 "$PY" -m pytest tests/test_flash_attention.py tests/test_attention_exact.py -m gpu -q -p no:cacheprovider

# Flash vs cuDNN vs jax's Pallas op: head_dim 128 and long sequences first; a budget cuts the rest.
step attention_gpu_bench 240 "$PY" benchmarks/attention_gpu.py --out "$OUT" \
  --seqs 1024,4096,16384 --head-dims 64,128 --budget-s 180

# fp8 vs bf16 [8192, 8192] matmul (median of 10) and the fp8 GEMM found in the compiled HLO.
step precision_fp8_bench 90 "$PY" benchmarks/precision.py --gpu --out "$OUT"

echo "== gpu_check done, status=$status" | tee -a "$LOG"
exit "$status"
