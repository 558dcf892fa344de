"""Uniform fake quantisation with straight-through gradients (Bengio et al. 2013,
"Estimating or Propagating Gradients Through Stochastic Neurons"; Jacob et al. 2018,
"Quantization and Training of Neural Networks for Efficient Integer-Arithmetic-Only
Inference").

``fake_quant(x, bits, ...)`` rounds ``x`` onto an n-bit grid and returns it dequantised,
in ``x``'s dtype, so training sees the quantisation error:

- symmetric: ``scale = absmax / (2**(bits-1) - 1)``, integers in ``[-(2**(bits-1)-1),
  2**(bits-1)-1]``, value ``q * scale``;
- asymmetric: ``scale = (max - min) / (2**bits - 1)``, ``zero = round(-min / scale)``,
  integers in ``[0, 2**bits - 1]``, value ``(q - zero) * scale``.

The statistics (absmax, min, max) are taken per tensor, per channel (every index of
``axis`` has its own scale), per token (each slice along ``axis``, normally the feature
axis, has its own scale) or per group (``axis`` cut into contiguous groups of
``group_size``). ``clip_ratio < 1`` shrinks the range before rounding.

Gradient rule (``ste``): ``"clipped"`` passes the incoming gradient unchanged where ``x``
lies inside the representable range and gives zero outside it; ``"identity"`` passes it
everywhere. The statistics are treated as constants (no gradient through the scale), as in
LLM-QAT's MinMax quantiser.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

GRANULARITIES = ("tensor", "channel", "token", "group")
STE_RULES = ("clipped", "identity")
MIN_BITS, MAX_BITS = 2, 8


def check_bits(bits: int, name: str = "bits") -> int:
    if not isinstance(bits, int) or not MIN_BITS <= bits <= MAX_BITS:
        raise ValueError(f"{name}={bits!r} is outside the supported range [{MIN_BITS}, {MAX_BITS}]")
    return bits


def ste(x, q, inside=None):
    """Value ``q``; gradient with respect to ``x``: identity, zeroed where not ``inside``."""
    x_pass = x if inside is None else jnp.where(inside, x, jax.lax.stop_gradient(x))
    return x_pass + jax.lax.stop_gradient(q - x_pass)


def _grouped(x, granularity: str, axis: int, group_size: int | None):
    """``x`` reshaped so the statistics reduce over ``red`` axes; and how to undo it."""
    if granularity not in GRANULARITIES:
        raise ValueError(f"unknown granularity {granularity!r}; known: {list(GRANULARITIES)}")
    axis = axis % x.ndim if x.ndim else 0
    if granularity == "tensor":
        return x, tuple(range(x.ndim)), x.shape
    if granularity == "channel":
        return x, tuple(a for a in range(x.ndim) if a != axis), x.shape
    if granularity == "token":
        return x, (axis,), x.shape
    dim = x.shape[axis]
    if not isinstance(group_size, int) or group_size < 1 or dim % group_size:
        raise ValueError(f"group_size={group_size!r} does not divide dimension {dim} (axis {axis} "
                         f"of shape {x.shape})")
    shape = x.shape[:axis] + (dim // group_size, group_size) + x.shape[axis + 1:]
    return x.reshape(shape), (axis + 1,), x.shape


def quant_params(x, bits: int, *, symmetric: bool = True, granularity: str = "tensor",
                 axis: int = -1, group_size: int | None = None, clip_ratio: float = 1.0):
    """(scale, zero, qmin, qmax) for ``x`` in its grouped layout (see ``fake_quant``)."""
    check_bits(bits)
    if not 0.0 < clip_ratio <= 1.0:
        raise ValueError(f"clip_ratio={clip_ratio} must lie in (0, 1]")
    xg, red, _ = _grouped(x, granularity, axis, group_size)
    x32 = jax.lax.stop_gradient(xg).astype(jnp.float32)
    tiny = jnp.finfo(jnp.float32).tiny
    if symmetric:
        qmax = 2 ** (bits - 1) - 1
        amax = jnp.max(jnp.abs(x32), axis=red, keepdims=True) * clip_ratio
        scale = jnp.maximum(amax / qmax, tiny)
        return scale, jnp.zeros_like(scale), -qmax, qmax
    qmax = 2**bits - 1
    lo = jnp.min(x32, axis=red, keepdims=True) * clip_ratio
    hi = jnp.max(x32, axis=red, keepdims=True) * clip_ratio
    scale = jnp.maximum((hi - lo) / qmax, tiny)
    zero = jnp.round(-lo / scale)
    return scale, zero, 0, qmax


def fake_quant(x, bits: int, *, symmetric: bool = True, granularity: str = "tensor",
               axis: int = -1, group_size: int | None = None, clip_ratio: float = 1.0,
               ste_rule: str = "clipped"):
    """``x`` rounded to its n-bit grid and dequantised; straight-through gradient."""
    if ste_rule not in STE_RULES:
        raise ValueError(f"unknown ste_rule {ste_rule!r}; known: {list(STE_RULES)}")
    scale, zero, qmin, qmax = quant_params(x, bits, symmetric=symmetric, granularity=granularity,
                                           axis=axis, group_size=group_size, clip_ratio=clip_ratio)
    xg, _, shape = _grouped(x, granularity, axis, group_size)
    v = xg.astype(jnp.float32) / scale + zero
    q = jnp.clip(jnp.round(v), qmin, qmax)
    deq = ((q - zero) * scale).reshape(shape).astype(x.dtype)
    # Inside the range: the unrounded value maps inside [qmin - 1/2, qmax + 1/2].
    inside = None if ste_rule == "identity" else ((v >= qmin - 0.5) & (v <= qmax + 0.5)).reshape(shape)
    return ste(x, deq, inside)
