"""Give jax 8 CPU devices before it initialises, so sharding tests run on a real mesh.

Most of the suite's time on a 2-core CPU is XLA compiling small programs, so on CPU runs:
- LLVM codegen at ``--xla_backend_optimization_level=0`` (the HLO passes, fusion, buffer
  assignment and so every compiled-memory figure are unchanged; only machine-code
  optimisation is skipped; about a quarter less time);
- jax's persistent compilation cache in a per-user temporary folder, shared by the xdist
  workers and the subprocesses tests start, so a program compiled again (a resumed run, a
  CLI subprocess, the same step built by two tests) is loaded instead. A size cap (2 GiB,
  least recently used out) makes jax lock the folder around every read and write (with
  ``filelock``, a test extra), so processes compiling the same program at once (the
  multi-process tests) never read a half-written entry; without ``filelock`` there is no cache.
- the data caches (the weather simulation, curated SMILES, packed FASTA and alignments) in a
  per-user temporary folder shared by the workers and the subprocesses tests start
  (``SCISCALE_CACHE``), not in the user's own.
Either is left alone when set already (``XLA_FLAGS`` naming the level, ``JAX_COMPILATION_CACHE_DIR``);
``JAX_COMPILATION_CACHE_DIR=`` (empty) turns the cache off.
"""

import importlib.util
import os
import tempfile

os.environ.setdefault("JAX_PLATFORMS", "cpu")
_flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in _flags:
    _flags += " --xla_force_host_platform_device_count=8"
if os.environ["JAX_PLATFORMS"] == "cpu":
    if "xla_backend_optimization_level" not in _flags:
        _flags += " --xla_backend_optimization_level=0"
    if importlib.util.find_spec("filelock") is not None:
        os.environ.setdefault("JAX_COMPILATION_CACHE_DIR",
                              os.path.join(tempfile.gettempdir(), f"sciscale-jax-tests-{os.getuid()}"))
        os.environ.setdefault("JAX_COMPILATION_CACHE_MAX_SIZE", str(2 * 2 ** 30))
        os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")
os.environ["XLA_FLAGS"] = _flags.strip()
os.environ.setdefault("SCISCALE_CACHE", os.path.join(tempfile.gettempdir(), f"sciscale-jax-test-data-{os.getuid()}"))

import jax  # noqa: E402
import pytest  # noqa: E402


def _has(platform: str) -> bool:
    try:
        return len(jax.devices(platform)) > 0
    except RuntimeError:
        return False


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a GPU")
    skip_tpu = pytest.mark.skip(reason="needs a TPU")
    has_gpu, has_tpu = None, None
    for item in items:
        if "gpu" in item.keywords:
            has_gpu = _has("gpu") if has_gpu is None else has_gpu
            if not has_gpu:
                item.add_marker(skip_gpu)
        if "tpu" in item.keywords:
            has_tpu = _has("tpu") if has_tpu is None else has_tpu
            if not has_tpu:
                item.add_marker(skip_tpu)
