"""Small NNX building blocks shared by the models: dense layers, RMSNorm and LayerNorm, rotary positions.

Every parameter carries logical axis names from ``sciscale_jax.parallel.axes`` in its
``out_sharding`` metadata (no eager sharding: a rule table maps them to mesh axes later).
"""

from __future__ import annotations

import math
from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from sciscale_jax.parallel.rules import splittable
from sciscale_jax.quant import nf4


def param(rngs: nnx.Rngs, init, shape, axes, dtype) -> nnx.Param:
    """A parameter drawn from ``init`` and annotated with logical ``axes``."""
    if len(axes) != len(shape):
        raise ValueError(f"axes {axes} do not match shape {shape}")
    return nnx.Param(init(rngs.params(), shape, dtype), out_sharding=tuple(axes), eager_sharding=False)


class Dense(nnx.Module):
    """y[..., out_shape] = x[..., in_shape] . W[in_shape, out_shape] (+ b), computed as one 2-D matmul.

    Multi-dimensional ``in_shape`` / ``out_shape`` keep per-head structure visible to the
    sharding rules (e.g. a query kernel [embed, heads, kv]). ``matmul`` is the hook through
    which precision and quantisation schemes replace the plain dot.

    With ``lora_rank`` r > 0 the layer carries a LoRA adapter (Hu et al. 2021): y gains
    ``lora_scale * (x . A) . B`` with ``lora_a`` [in_shape, r] drawn like the kernel and ``lora_b``
    [r, out_shape] zero, so a new adapter leaves the layer's output unchanged; A's input axes and
    B's output axes carry the kernel's logical axes, the rank axis none (replicated).

    With ``base_quant="nf4"`` (QLoRA's frozen base, ``sciscale_jax.quant.nf4``) the kernel is drawn
    as usual and stored in 4 bits: ``kernel_nf4`` (uint8 codes, two per byte along the last axis)
    and ``kernel_absmax`` (one scale per block), both with the kernel's logical axes; it is
    dequantised to ``dtype`` at each call. ``base_quant="nf4-dq"`` double-quantises the scales
    where a row holds at least ``nf4.DOUBLE_MIN_BLOCKS`` blocks: ``kernel_absmax_q`` (int8, the
    kernel's axes) and ``kernel_absmax_dq`` (each row's mean and step, [..., 2], its last axis
    unsplit).
    """

    def __init__(self, in_shape: Sequence[int], out_shape: Sequence[int], axes: Sequence[str], *,
                 rngs: nnx.Rngs, dtype=jnp.float32, param_dtype=jnp.float32, use_bias: bool = False,
                 matmul=None, lora_rank: int = 0, lora_scale: float = 1.0, base_quant: str = "none"):
        self.in_shape, self.out_shape = tuple(in_shape), tuple(out_shape)
        fan_in = math.prod(self.in_shape)
        init = jax.nn.initializers.normal(stddev=fan_in ** -0.5)
        if base_quant not in ("none", "nf4", "nf4-dq"):
            raise ValueError(f"base_quant={base_quant!r} must be 'none', 'nf4' or 'nf4-dq'")
        kernel = param(rngs, init, self.in_shape + self.out_shape, axes, param_dtype)
        stored = lambda x, a=tuple(axes): nnx.Param(x, out_sharding=a, eager_sharding=False)  # noqa: E731
        codes = absmax = absmax_q = absmax_dq = None
        if base_quant != "none":
            block = nf4.block_length(self.out_shape[-1], split=splittable(axes[-1]))
            codes, absmax = nf4.quantize(kernel.get_value(), block)
            codes = stored(codes)
            if base_quant == "nf4" or absmax.shape[-1] < nf4.DOUBLE_MIN_BLOCKS:  # too few per row to pay
                absmax = stored(absmax.astype(param_dtype))
            else:
                q, rows = nf4.double_quantize(absmax, param_dtype)
                absmax, absmax_q, absmax_dq = None, stored(q), stored(rows, (*axes[:-1], None))
        self.kernel = kernel if base_quant == "none" else None
        self.kernel_nf4, self.kernel_absmax, self.kernel_absmax_q, self.kernel_absmax_dq = (
            codes, absmax, absmax_q, absmax_dq)
        self.bias = (param(rngs, jax.nn.initializers.zeros, self.out_shape, axes[len(self.in_shape):], param_dtype)
                     if use_bias else None)
        n_in = len(self.in_shape)
        self.lora_a = (param(rngs, init, self.in_shape + (lora_rank,), tuple(axes[:n_in]) + (None,), param_dtype)
                       if lora_rank else None)
        self.lora_b = (param(rngs, jax.nn.initializers.zeros, (lora_rank,) + self.out_shape,
                             (None,) + tuple(axes[n_in:]), param_dtype) if lora_rank else None)
        self.lora_scale = lora_scale
        self.dtype = dtype
        self.matmul = matmul

    def __call__(self, x):
        lead = x.shape[: x.ndim - len(self.in_shape)]
        x2 = x.reshape(*lead, math.prod(self.in_shape)).astype(self.dtype)
        shape2 = (math.prod(self.in_shape), math.prod(self.out_shape))
        if self.kernel_nf4 is None:
            w2 = self.kernel[...].astype(self.dtype).reshape(shape2)
            y = x2 @ w2 if self.matmul is None else self.matmul(x2, w2)
        elif self.kernel_absmax is not None:  # dequantised again for the backward pass, never kept
            y = jax.checkpoint(lambda x, c, s: x @ nf4.dequantize(c, s, self.dtype).reshape(shape2))(
                x2, self.kernel_nf4[...], self.kernel_absmax[...])
        else:  # the scales double-quantised
            y = jax.checkpoint(lambda x, c, q, r: x @ nf4.dequantize(
                c, nf4.double_dequantize(q, r), self.dtype).reshape(shape2))(
                x2, self.kernel_nf4[...], self.kernel_absmax_q[...], self.kernel_absmax_dq[...])
        if self.lora_a is not None:
            a2 = self.lora_a[...].astype(self.dtype).reshape(x2.shape[-1], -1)
            b2 = self.lora_b[...].astype(self.dtype).reshape(a2.shape[-1], shape2[1])
            y = y + ((x2 @ a2) @ b2) * jnp.asarray(self.lora_scale, self.dtype)
        y = y.reshape(*lead, *self.out_shape)
        if self.bias is not None:
            y = y + self.bias[...].astype(self.dtype)
        return y


LORA_SUFFIX = "_lora"  # an adapter module named "<weight>_lora" adapts its parent's parameter "<weight>"


class LoraAdapter(nnx.Module):
    """A LoRA adapter (Hu et al. 2021) kept beside the weight it adapts, for layers that hold
    several weights or name them otherwise than ``Dense`` (the Evoformer's ``query_w``, ``weights``):
    ``adapter(x)[..., out_shape] = scale * (x[..., in_shape] . A) . B``, to be added to ``x . W``.
    Named ``<weight>_lora`` beside ``<weight>`` (``LORA_SUFFIX``), so ``models.stack.merge_lora``
    folds it into that weight. ``lora_a`` [in_shape, r] is drawn like a fan-in normal, ``lora_b``
    [r, out_shape] is zero (a new adapter changes nothing); the axes are the weight's."""

    def __init__(self, in_shape: Sequence[int], out_shape: Sequence[int], axes: Sequence[str], rank: int,
                 scale: float, *, rngs: nnx.Rngs, dtype=jnp.float32, param_dtype=jnp.float32):
        self.in_shape, self.out_shape = tuple(in_shape), tuple(out_shape)
        n_in = len(self.in_shape)
        init = jax.nn.initializers.normal(stddev=math.prod(self.in_shape) ** -0.5)
        self.lora_a = param(rngs, init, self.in_shape + (rank,), tuple(axes[:n_in]) + (None,), param_dtype)
        self.lora_b = param(rngs, jax.nn.initializers.zeros, (rank,) + self.out_shape, (None,) + tuple(axes[n_in:]),
                            param_dtype)
        self.scale, self.dtype = scale, dtype

    def __call__(self, x):
        lead = x.shape[: x.ndim - len(self.in_shape)]
        x2 = x.reshape(*lead, math.prod(self.in_shape)).astype(self.dtype)
        a2 = self.lora_a[...].astype(self.dtype).reshape(x2.shape[-1], -1)
        b2 = self.lora_b[...].astype(self.dtype).reshape(a2.shape[-1], -1)
        y = ((x2 @ a2) @ b2) * jnp.asarray(self.scale, self.dtype)
        return y.reshape(*lead, *self.out_shape)


class RMSNorm(nnx.Module):
    """Root-mean-square normalisation (Zhang & Sennrich 2019), computed in float32."""

    def __init__(self, dim: int, *, rngs: nnx.Rngs, eps: float = 1e-6, dtype=jnp.float32,
                 param_dtype=jnp.float32):
        self.scale = param(rngs, jax.nn.initializers.ones, (dim,), ("embed",), param_dtype)
        self.eps, self.dtype = eps, dtype

    def __call__(self, x):
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return (y * self.scale[...].astype(jnp.float32)).astype(self.dtype)


class LayerNorm(nnx.Module):
    """Layer normalisation (Ba et al. 2016) with a learned scale and bias, computed in float32."""

    def __init__(self, dim: int, *, rngs: nnx.Rngs, eps: float = 1e-5, dtype=jnp.float32,
                 param_dtype=jnp.float32):
        self.scale = param(rngs, jax.nn.initializers.ones, (dim,), ("embed",), param_dtype)
        self.bias = param(rngs, jax.nn.initializers.zeros, (dim,), ("embed",), param_dtype)
        self.eps, self.dtype = eps, dtype

    def __call__(self, x):
        x32 = x.astype(jnp.float32)
        mean = jnp.mean(x32, axis=-1, keepdims=True)
        centred = x32 - mean
        y = centred * jax.lax.rsqrt(jnp.mean(centred * centred, axis=-1, keepdims=True) + self.eps)
        return (y * self.scale[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)).astype(self.dtype)


def rotary(x_bshd, positions_bs, base: float = 10000.0):
    """Rotary position embedding (Su et al. 2021) on the last dimension, rotating half-pairs."""
    half = x_bshd.shape[-1] // 2
    freqs = base ** (-jnp.arange(half, dtype=jnp.float32) / half)
    angles_bs1f = (positions_bs.astype(jnp.float32)[..., None] * freqs)[:, :, None, :]
    sin, cos = jnp.sin(angles_bs1f), jnp.cos(angles_bs1f)
    x1, x2 = jnp.split(x_bshd.astype(jnp.float32), 2, axis=-1)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x_bshd.dtype)


def dropout(x, rate: float, key):
    """Inverted dropout; identity when ``key`` is None or ``rate`` is 0."""
    if key is None or rate == 0.0:
        return x
    keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), 0).astype(x.dtype)
