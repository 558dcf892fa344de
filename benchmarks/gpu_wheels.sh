#!/usr/bin/env bash
# Builds .gpu_wheels/ (gitignored): tokamax and the pure-Python packages it imports that the GPU
# machine lacks, for its Python 3.12 on x86-64 Linux, and pyhmmer, whose wheel holds the proteins
# benchmarks/packed_attention.py packs (only its data files are read; 4 MB). Run it on a machine that reaches PyPI, then
# carry the folder with the device tool (carry [".gpu_wheels"]); benchmarks/gpu_check.sh installs
# the wheels with --target into /tmp/tokamax_site, used by its attention steps only.
#   bash benchmarks/gpu_wheels.sh [PYTHON]   # PYTHON: any python with pip (default python3)
# The list is what `import tokamax` needed beside jax 0.11.2, flax, optax, orbax-checkpoint, chex
# and pytest (the GPU machine's set) on 2026-12-01; xprof, which tokamax imports for its
# benchmarking helpers only, is left out (sciscale_jax.attention.tokamax_backend stands in for it).
# Checked: a Python 3.12 venv with jax 0.11.2 imports tokamax from these wheels alone and passes
# tests/test_attention_tokamax.py (CPU).
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${1:-python3}"
DEST=.gpu_wheels
rm -rf "$DEST"
mkdir -p "$DEST"
"$PY" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 \
  --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform any --dest "$DEST" \
  tokamax==0.0.17 einshape==1.0 immutabledict==4.3.1 jaxtyping==0.3.11 wadler_lindig==0.1.8 \
  tqdm==4.70.1 qwix==0.1.8 pydantic==2.14.4 pydantic_core==2.50.5 typing_inspection==0.4.5 \
  annotated_types==0.8.0
"$PY" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 \
  --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 \
  --dest "$DEST" pyhmmer==0.12.3
ls -1 "$DEST"
