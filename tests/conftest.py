"""Give jax 8 CPU devices before it initialises, so sharding tests run on a real mesh."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
_flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in _flags:
    os.environ["XLA_FLAGS"] = (_flags + " --xla_force_host_platform_device_count=8").strip()

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
