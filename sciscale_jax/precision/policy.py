"""Mixed-precision dtype policies (Micikevicius et al. 2018, "Mixed Precision Training").

A ``Policy`` says in which dtype parameters are stored (the fp32 "master" copy), in which
dtype the forward/backward arithmetic runs, and in which dtype a model returns its outputs.
Presets, chosen by name through ``get_policy``:

- ``"fp32"``: everything in float32.
- ``"bf16"``: float32 master parameters, bfloat16 compute, float32 outputs.
- ``"fp16"``: float32 master parameters, float16 compute, float32 outputs; needs dynamic
  loss scaling (``loss_scaling=True``, see ``loss_scale.py``) because float16's range is
  narrow and small gradients underflow.
- ``"fp8"``: as ``"bf16"``, and the linear layers run their matmuls in fp8
  (``fp8=True``, see ``fp8.py``: e4m3 forward, e5m2 backward).

The cast helpers only touch floating-point leaves; integer leaves (token ids, counters)
pass through unchanged.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

# dtypes a policy may name for parameters, compute and outputs.
_ALLOWED = {np.dtype(d) for d in (jnp.float32, jnp.bfloat16, jnp.float16, jnp.float64)}


def _as_float_dtype(value: Any, field: str) -> np.dtype:
    try:
        dt = np.dtype(value)
    except TypeError as e:
        raise ValueError(f"Policy.{field}={value!r} is not a dtype") from e
    if dt not in _ALLOWED:
        names = sorted(d.name for d in _ALLOWED)
        raise ValueError(f"Policy.{field}={dt.name} is not one of {names}")
    return dt


@dataclasses.dataclass(frozen=True)
class Policy:
    """Where each dtype is used. ``fp8`` asks linear layers for fp8 matmuls; it needs a
    compute dtype of 16 bits or more (bfloat16, float16, float32) to hold the dequantised
    results. ``loss_scaling`` asks the train step for dynamic loss scaling."""

    param_dtype: Any
    compute_dtype: Any
    output_dtype: Any
    loss_scaling: bool = False
    fp8: bool = False

    def __post_init__(self):
        for field in ("param_dtype", "compute_dtype", "output_dtype"):
            object.__setattr__(self, field, _as_float_dtype(getattr(self, field), field))
        if self.fp8 and self.compute_dtype == np.dtype(jnp.float64):
            raise ValueError(
                f"Policy(fp8=True) cannot use compute_dtype={self.compute_dtype.name}: fp8 "
                "matmuls accumulate in float32 and return bfloat16, float16 or float32")

    def cast_to_param(self, tree):
        return _cast_floating(tree, self.param_dtype)

    def cast_to_compute(self, tree):
        return _cast_floating(tree, self.compute_dtype)

    def cast_to_output(self, tree):
        return _cast_floating(tree, self.output_dtype)


def _cast_floating(tree, dtype):
    def cast(x):
        if hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jnp.floating):
            return jnp.asarray(x).astype(dtype)
        return x

    return jax.tree.map(cast, tree)


POLICIES: dict[str, Policy] = {
    "fp32": Policy(jnp.float32, jnp.float32, jnp.float32),
    "bf16": Policy(jnp.float32, jnp.bfloat16, jnp.float32),
    "fp16": Policy(jnp.float32, jnp.float16, jnp.float32, loss_scaling=True),
    "fp8": Policy(jnp.float32, jnp.bfloat16, jnp.float32, fp8=True),
}


def get_policy(name: str | Policy) -> Policy:
    """The preset called ``name`` (a ``Policy`` passes through unchanged)."""
    if isinstance(name, Policy):
        return name
    if name not in POLICIES:
        raise ValueError(f"unknown precision policy {name!r}; known: {sorted(POLICIES)}")
    return POLICIES[name]
