"""The attention front door: one signature, implementations chosen by name.

``dot_product_attention(q, k, v, *, bias, mask, causal, scale, impl)`` validates shapes
before anything compiles, then dispatches to a registered implementation. Layout:
q [batch, q_len, heads, head_dim]; k, v [batch, kv_len, kv_heads, head_dim] with kv_heads
dividing heads; bias and mask broadcastable to [batch, heads, q_len, kv_len].
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from sciscale_jax.attention.xla import xla_attention

# name -> fn(q, k, v, *, bias, mask, causal, scale). Other modules register themselves.
_IMPLS: dict[str, Callable] = {"xla": xla_attention}


def register(name: str, fn: Callable) -> None:
    """Register an attention implementation under ``name``."""
    _IMPLS[name] = fn


def available() -> tuple[str, ...]:
    """Names accepted by ``impl``."""
    return tuple(sorted(_IMPLS))


def validate_impl(name: str) -> str:
    if name not in _IMPLS:
        raise ValueError(f"unknown attention implementation {name!r}; known: {', '.join(available())}")
    return name


def check_shapes(q, k, v, bias=None, mask=None) -> None:
    """Raise a ValueError naming the shapes when the inputs do not fit the layout."""
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise ValueError(f"q, k, v must be [batch, seq, heads, head_dim]; got {q.shape}, {k.shape}, {v.shape}")
    if k.shape != v.shape:
        raise ValueError(f"k and v shapes differ: {k.shape} vs {v.shape}")
    if q.shape[0] != k.shape[0] or q.shape[-1] != k.shape[-1]:
        raise ValueError(f"batch or head_dim mismatch: q {q.shape} vs k {k.shape}")
    heads, kv_heads = q.shape[2], k.shape[2]
    if heads % kv_heads:
        raise ValueError(f"kv_heads={kv_heads} does not divide heads={heads}")
    target = (q.shape[0], heads, q.shape[1], k.shape[1])
    for label, x in (("bias", bias), ("mask", mask)):
        if x is None:
            continue
        try:
            if x.ndim > 4 or np.broadcast_shapes(tuple(x.shape), target) != target:
                raise ValueError
        except ValueError:
            raise ValueError(f"{label} of shape {tuple(x.shape)} does not broadcast to "
                             f"[batch, heads, q_len, kv_len] = {target}") from None


def dot_product_attention(q, k, v, *, bias=None, mask=None, causal=False, scale=None, impl="xla"):
    """Scaled dot-product attention softmax(q k^T * scale + bias) v, masked and optionally causal."""
    fn = _IMPLS[validate_impl(impl)]
    check_shapes(q, k, v, bias, mask)
    return fn(q, k, v, bias=bias, mask=mask, causal=causal, scale=scale)
