#!/usr/bin/env bash
# The one script a GPU session runs (issue 20), in one device call: step limits add up to 590 s
# (about 420 s on an H200 from the 2026-12-04 runs' step times), so call it with timeout_s=600 and
# carry [".gpu_wheels"], keeping the rest of the 15-minute budget for a rerun of what failed:
#   OUT=/some/dir bash benchmarks/gpu_check.sh
# Installs the project (and, where the gitignored folder .gpu_wheels/ was carried, tokamax, the
# pure-Python packages it needs and pyhmmer's wheel for its proteins, into /tmp/tokamax_site, used
# by the attention steps only; benchmarks/gpu_wheels.sh builds that folder on a machine that
# reaches PyPI), runs the GPU-marked tests with JAX_PLATFORMS=cuda (the sm90 Mosaic GPU kernels'
# apart) and the Evoformer tests, then the benchmarks: end-to-end MFU of the protein Transformer at
# 350M and 1B parameters, attention kernels at head_dim 128 (sm90 and cuDNN without a bias; sm90,
# our Triton flash and tokamax with a pair bias), one Evoformer block with auto's attention and
# with sm90, and attention on packed protein rows. The sm90 variants' GPU tests (the fused
# backward, kernels/flash_attention_sm90_bwd.py; the persistent forward grid) are in sm90_tests;
# they passed on 2026-12-04, so the tuner now times them (SM90_FUSED_GPU_TESTED,
# SM90_PERSISTENT_GPU_TESTED), and their benchmark, like the Evoformer's attention calls one by
# one, is opt-in since (both measured: benchmarks/results/*h200*).
# Everything lands under $OUT (default benchmarks/results): gpu_check.log, attention_gpu.json,
# mfu_gpu_350m.json, mfu_gpu_1b.json, evoformer_gpu.json, packed_attention_<device>.json (and
# attention_gpu_variants.json, attention_evoformer_gpu.json when asked for; the device tool
# returns at most 8 files): the benchmarks' markdown tables are in gpu_check.log, and their .md
# files are removed at the end unless OUT is benchmarks/results (each script's table() rebuilds
# them from the JSON). Earlier steps dropped to fit (remat, offload, fp8, remat paths) have their
# H200 results in benchmarks/results/*h200*.
# A failing step is recorded and the script goes on; the exit status is 1 if any failed.
# ONLY=name,name,... runs just those steps (install, wheels and devices always run), e.g. to rerun
# what failed; the opt-in steps attention_sm90_variants, attention_evoformer_shapes,
# evoformer_block_tuned and prefetch run only when named there. EVO_SWEEP=1 adds
# the sm90 configuration sweep to attention_evoformer_shapes (about 60 s more).
# (The 2026-11-30 follow-up call: ONLY=attention_evoformer_shapes,evoformer_block_tuned EVO_SWEEP=1,
# timeout_s=320.)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-benchmarks/results}"
mkdir -p "$OUT"
LOG="$OUT/gpu_check.log"
PY="${PYTHON:-python3}"
export PYTHONUNBUFFERED=1
status=0
last_rc=0

step() {  # step NAME TIMEOUT_S CMD...: run, log, time, record failure
  local name=$1 limit=$2 start=$SECONDS rc
  shift 2
  if [ -n "${ONLY:-}" ] && [[ ",$ONLY,install,wheels,devices," != *",$name,"* ]]; then
    echo "== $name: skipped (ONLY=$ONLY)" | tee -a "$LOG"
    return
  fi
  echo "== $name: $*" | tee -a "$LOG"
  timeout "$limit" "$@" 2>&1 | tee -a "$LOG"
  rc=${PIPESTATUS[0]}
  echo "== $name: rc=$rc after $((SECONDS - start)) s" | tee -a "$LOG"
  last_rc=$rc
  [ "$rc" -eq 0 ] || status=1
}

# pyproject's license is an SPDX string, which setuptools < 77 cannot read; where the machine's
# setuptools is older, the install retries with this copy's pyproject in the older table form.
step install 15 env PY="$PY" bash -c '"$PY" -m pip install -q --no-deps --no-build-isolation -e . && exit 0
  echo "install: retrying with the license as a table (setuptools $("$PY" -c "import setuptools as s; print(s.__version__)"))"
  sed -i "s/^license = \"Apache-2.0\"$/license = { text = \"Apache-2.0\" }/" pyproject.toml
  "$PY" -m pip install -q --no-deps --no-build-isolation -e .'
TOKAMAX_SITE=/tmp/tokamax_site
if ls .gpu_wheels/*.whl >/dev/null 2>&1; then
  step wheels 10 "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target "$TOKAMAX_SITE" .gpu_wheels/*.whl
else
  echo "== wheels: no .gpu_wheels/ carried; tokamax will be skipped" | tee -a "$LOG"
fi
export JAX_PLATFORMS=cuda
step devices 10 "$PY" -c "import jax; print('jax', jax.__version__, jax.devices())"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv 2>&1 | tee -a "$LOG"

# Tests run in 4 pytest workers (xdist) on the one GPU, without XLA's preallocation so they share
# it; --timeout (pytest-timeout) dumps the stacks of a test that hangs and names it.
export XLA_PYTHON_CLIENT_PREALLOCATE=false
PYTEST=("$PY" -m pytest -q -p no:cacheprovider -n 4 --timeout 60 --durations=5)
# Kernel, attention, packed-row and offload tests on the compiled GPU path (every test marked gpu;
# others deselected): 9 passed in 30 s on the H200 (2026-12-04), before the 4 packed-row cases.
step gpu_tests 60 "${PYTEST[@]}" tests -m gpu --continue-on-collection-errors --ignore=tests/test_flash_sm90.py
# The sm90 Mosaic GPU kernels apart (a barrier mistake would hang them), tuning off (it would time
# each test shape's candidates first).
# 30 tests (the fused backward's and the persistent forward's among them): 29 passed, 1 skipped
# (a case the fused backward's shared memory cannot hold) in 58 s in 4 workers on the H200
# (2026-12-04).
SCISCALE_SM90_TUNING=off step sm90_tests 110 "${PYTEST[@]}" tests/test_flash_sm90.py -m gpu
# Benchmarked unless the tests hung (timeout's 124): a wrong answer still has a speed worth knowing.
sm90_ok=$([ "$last_rc" -ne 124 ] && echo 1 || echo 0)
# The Evoformer against its float64 transcription of AlphaFold 2 on the GPU's compiled path (float32
# matmuls at full precision: the GPU's default would use TF32).
JAX_DEFAULT_MATMUL_PRECISION=highest step evoformer_tests 45 "${PYTEST[@]}" tests/test_evoformer.py
unset XLA_PYTHON_CLIENT_PREALLOCATE

# End-to-end train step (AdamW, bf16 policy, attention auto -> cuDNN, no remat, scanned layers):
# 14 s each on an H200 (limits 20 s).
step mfu_350m 20 "$PY" benchmarks/mfu_gpu.py --size 350m --batch 8 --seq 2048 --out "$OUT"
step mfu_1b 20 "$PY" benchmarks/mfu_gpu.py --size 1b --batch 8 --seq 2048 --out "$OUT"

# Attention fwd+bwd TFLOP/s at head_dim 128: without a bias at seq 16k and 4k (sm90 against cuDNN),
# with a [1, H, S, S] pair bias at 4k (sm90 against our Triton flash and tokamax), causal and not;
# 79 s on an H200. tokamax sees the carried wheels through PYTHONPATH. Results are written
# after every measurement, so a cut-short run keeps what finished. sm90 at its default block sizes
# (the tuner's H200 picks): tuning each shape class first would spend the step's budget.
impls=cudnn; pair_impls=flash,tokamax
[ "$sm90_ok" = 1 ] && impls=$impls,sm90 && pair_impls=$pair_impls,sm90
PYTHONPATH="$TOKAMAX_SITE${PYTHONPATH:+:$PYTHONPATH}" SCISCALE_SM90_TUNING=off \
  step attention_gpu_bench 105 "$PY" benchmarks/attention_gpu.py --out "$OUT" --impls "$impls" \
  --pair-impls "$pair_impls" --seqs 16384,4096 --pair-seqs 4096 --head-dims 128 --biases none,pair --causal 0,1 \
  --budget-s 90

# Opt-in (named in ONLY): the sm90 variants against sm90's defaults and cuDNN in the same run,
# head_dim 128, no bias (the fused backward does not fit shared memory beside a bias ring there),
# 16k then 4k: sm90_fused (one backward kernel, 5 tile products instead of 7) and sm90_persistent
# (one CTA per SM looping over query tiles); 63 s on the H200 (2026-12-04), the budget cuts the 4k
# points first.
asked() { [[ ",${ONLY:-}," == *",$1,"* ]]; }
if [ "$sm90_ok" = 1 ] && asked attention_sm90_variants; then
  SCISCALE_SM90_TUNING=off step attention_sm90_variants 95 "$PY" benchmarks/attention_gpu.py --out "$OUT" \
    --tag _variants --impls sm90,sm90_fused,sm90_persistent,cudnn --seqs 16384,4096 --head-dims 128 \
    --biases none --causal 0,1 --budget-s 80
fi

# Opt-in (named in ONLY): each of the Evoformer's attention calls at crop 256 (MSA row: 128 rows
# of 256 residues, 8 heads of 32, the pair bias [1, 8, 256, 256] shared by the rows; MSA column:
# 256 columns of 128; triangle: 256 rows of 256, 4 heads; each with its key mask) through the front
# door: sm90 against our Triton flash, tokamax and XLA's plain attention (what AlphaFold runs); 70 s
# without the sweep. Its result files feed auto's table at head_dim 32 (add them with --table-from).
evo_impls=flash,tokamax,xla
[ "$sm90_ok" = 1 ] && evo_impls=$evo_impls,sm90,sm90_fused
if asked attention_evoformer_shapes; then
  PYTHONPATH="$TOKAMAX_SITE${PYTHONPATH:+:$PYTHONPATH}" SCISCALE_SM90_TUNING=off \
    step attention_evoformer_shapes 90 "$PY" benchmarks/attention_evoformer_gpu.py --out "$OUT" \
    --impls "$evo_impls" ${EVO_SWEEP:+--sm90-sweep} --budget-s 65
fi

# One Evoformer block at crop 256 (N_seq 128, c_m 256, c_z 128), bf16: time, TFLOP/s, peak memory
# (63 s for both on the H200), with auto's pick and with sm90 at head_dim 32 (tuning off: it would
# time every attention's shape class first).
evo_attn=auto
[ "$sm90_ok" = 1 ] && evo_attn=$evo_attn,sm90
SCISCALE_SM90_TUNING=off step evoformer_block 75 "$PY" benchmarks/evoformer_gpu.py --out "$OUT" \
  --attentions "$evo_attn"

# Packed protein rows (protein-mlm --pack's segment ids, proteins from the carried pyhmmer wheel),
# ESM-2 650M's 20 heads of 64, bf16, 32,768 tokens per call, forward + backward: chunked computing
# every tile and skipping those whose proteins cannot meet (256 x 512, its GPU tiles), our Triton
# flash with and without its skip, and cuDNN, sm90 and auto with the ids (as a mask where they take
# no ids), each one's gradients against float32 xla's; results written after each length; 81 s on
# the H200 (2026-12-04, with 128 x 128 tiles too and without the gradient check).
PYTHONPATH="$TOKAMAX_SITE${PYTHONPATH:+:$PYTHONPATH}" SCISCALE_SM90_TUNING=off \
  step packed_attention 120 "$PY" benchmarks/packed_attention.py --out "$OUT" --seq-lens 4096 1024 2048 \
  --tokens 32768 --dtype bfloat16 --heads 20 --head-dim 64 --tiles 256x512 --reps 3 \
  --impls flash,cudnn,sm90,auto --train-seq-lens

# Opt-in (named in ONLY): the Evoformer block on sm90 with the tuner on (each attention shape
# class's candidates timed first, the picks written beside the results); 86 s on the H200 before the
# fused backward and the persistent forward joined the candidates (more now).
if [ "$sm90_ok" = 1 ] && asked evoformer_block_tuned; then
  SCISCALE_SM90_TUNING="$OUT/sm90_tuning.json" step evoformer_block_tuned 100 \
    "$PY" benchmarks/evoformer_gpu.py --out "$OUT/tuned" --attentions sm90
fi

# Opt-in (named in ONLY): training step time of msa-evoformer with AlphaFold's features with the
# batches built when their step starts, built ahead (--prefetch 2, 4) and all built first; on
# 2 CPU cores the step itself keeps the cores busy (1.05x), on a GPU the host is idle during a step.
if asked prefetch; then
  step prefetch 120 "$PY" benchmarks/prefetch.py --steps 200 --recipes msa-evoformer --out "$OUT"
fi

if [ "$OUT" != benchmarks/results ]; then  # (the device tool's 8 files) their tables are in the log
  rm -f "$OUT/attention_gpu.md" "$OUT/attention_gpu_variants.md" "$OUT/attention_evoformer_gpu.md" \
    "$OUT"/packed_attention_*.md
fi
echo "== gpu_check done, status=$status" | tee -a "$LOG"
exit "$status"
