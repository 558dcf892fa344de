#!/usr/bin/env bash
# The one script a GPU session runs. Step limits add up to 595 s; a normal run takes about 4
# minutes (245 s on an H200). Call it with timeout_s=480, which cuts the last steps only if the
# earlier ones all run to their limits, and keep the rest of the 15-minute budget, machine start
# included, for one rerun of what failed:
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

step install 45 "$PY" -m pip install -q --no-deps --no-build-isolation -e .
export JAX_PLATFORMS=cuda
step devices 30 "$PY" -c "import jax; print('jax', jax.__version__, jax.devices())"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 | tee -a "$LOG"

# Kernel tests on the compiled GPU path, and host offload freeing device memory (skipped on CPU).
step gpu_tests 100 "$PY" -m pytest tests/test_flash_attention.py tests/test_attention_exact.py \
  tests/test_offload.py -m gpu -q -p no:cacheprovider

# Remat policies at seq 2048 (issue 5): compiled memory, step time vs "none", host-offloaded residuals.
step activation_memory_bench 150 "$PY" benchmarks/activation_memory.py --out "$OUT/activation_memory_gpu" \
  --seq 2048 --depths 2 4 --batch 4 --embed 1024 --heads 8 --repeats 10 --no-accum \
  --policies none selective full offload:qkv,mlp_hidden

# ZeRO-Offload placement of AdamW state / master params: device bytes freed, same training.
# Deterministic GPU ops so "identical to the on-device run" can be checked bit for bit.
XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_deterministic_ops=true" \
  step offload_memory_bench 90 "$PY" benchmarks/offload_memory.py --out "$OUT/offload_memory" \
  --bf16 --remat none --batch 16 --repeats 5

# Flash vs cuDNN vs jax's Pallas op: head_dim 128 and long sequences first; a budget cuts the rest.
step attention_gpu_bench 90 "$PY" benchmarks/attention_gpu.py --out "$OUT" \
  --seqs 4096,16384,1024 --head-dims 128,64 --budget-s 70

# fp8 vs bf16 [8192, 8192] matmul (median of 10) and the fp8 GEMM found in the compiled HLO.
step precision_fp8_bench 90 "$PY" benchmarks/precision.py --gpu --out "$OUT"

echo "== gpu_check done, status=$status" | tee -a "$LOG"
exit "$status"
