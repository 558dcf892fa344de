"""BitNet (Wang et al. 2023, "BitNet: Scaling 1-bit Transformers for Large Language
Models") and BitNet b1.58 (Ma et al. 2024, "The Era of 1-bit LLMs: All Large Language
Models are in 1.58 Bits").

- 1-bit weights: ``sign(W - mean(W)) * mean(|W|)``, sign taken as +1 for positive, -1
  otherwise.
- 1.58-bit weights: ``RoundClip(W / (mean|W| + eps), -1, 1) * mean|W|``, values in
  ``{-1, 0, +1} * mean|W|``.
- activations: after a parameter-free normalisation (LayerNorm for BitNet, RMSNorm for
  b1.58, as in the papers' BitLinear), absmax-quantised to ``bits`` (8) per token:
  ``s = (2**(bits-1) - 1) / max|x|``, ``q = clip(round(x * s), -2**(bits-1), 2**(bits-1)-1)``,
  value ``q / s``.

Training keeps full-precision latent weights; every quantiser uses the identity
straight-through estimator (gradient passed unchanged everywhere, including weights that
RoundClip clips), as the papers' reference code does.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from sciscale_jax.quant.fake_quant import ste

WEIGHT_KINDS = ("binary", "ternary")


def binarize_weight(w):
    """1-bit BitNet weights, dequantised, with identity STE."""
    w32 = jax.lax.stop_gradient(w).astype(jnp.float32)
    beta = jnp.mean(jnp.abs(w32))
    wb = jnp.where(w32 - jnp.mean(w32) > 0, 1.0, -1.0)
    return ste(w, (wb * beta).astype(w.dtype))


def ternarize_weight(w, eps: float = 1e-5):
    """1.58-bit (absmean ternary) weights, dequantised, with identity STE."""
    w32 = jax.lax.stop_gradient(w).astype(jnp.float32)
    gamma = jnp.mean(jnp.abs(w32))
    q = jnp.clip(jnp.round(w32 / (gamma + eps)), -1.0, 1.0)
    return ste(w, (q * gamma).astype(w.dtype))


def _check_a_bits(bits):
    if not isinstance(bits, int) or not 2 <= bits <= 8:
        raise ValueError(f"activation bits={bits!r} is outside the supported range [2, 8]")


def absmax_quant_tokens(x, bits: int = 8, eps: float = 1e-5):
    """Per-token (last axis) absmax quantisation to ``bits``, dequantised, identity STE."""
    _check_a_bits(bits)
    x32 = jax.lax.stop_gradient(x).astype(jnp.float32)
    s = (2 ** (bits - 1) - 1) / jnp.maximum(jnp.max(jnp.abs(x32), axis=-1, keepdims=True), eps)
    q = jnp.clip(jnp.round(x32 * s), -(2 ** (bits - 1)), 2 ** (bits - 1) - 1)
    return ste(x, (q / s).astype(x.dtype))


def _normalise(x, kind: str, eps: float = 1e-6):
    x32 = x.astype(jnp.float32)
    if kind == "binary":  # LayerNorm without affine parameters
        x32 = x32 - jnp.mean(x32, axis=-1, keepdims=True)
    return (x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)).astype(x.dtype)


class BitMatmul(nnx.Module):
    """The ``matmul(x[..., k], w[k, m])`` hook of a dense layer, BitNet style: normalise and
    quantise ``x`` per token, binarise or ternarise ``w``."""

    def __init__(self, *, weight: str = "binary", a_bits: int = 8, normalize: bool = True):
        if weight not in WEIGHT_KINDS:
            raise ValueError(f"unknown BitNet weight kind {weight!r}; known: {list(WEIGHT_KINDS)}")
        _check_a_bits(a_bits)
        self.weight, self.a_bits, self.normalize = weight, a_bits, normalize

    def __call__(self, x_nk, w_km):
        if self.normalize:
            x_nk = _normalise(x_nk, self.weight)
        xq_nk = absmax_quant_tokens(x_nk, self.a_bits)
        wq_km = binarize_weight(w_km) if self.weight == "binary" else ternarize_weight(w_km)
        return xq_nk @ wq_km


class BitLinear(nnx.Module):
    """Standalone BitLinear: y = BitMatmul(x, W) (+ b), full-precision latent W."""

    def __init__(self, in_features: int, out_features: int, *, rngs: nnx.Rngs, weight: str = "binary",
                 a_bits: int = 8, use_bias: bool = False, param_dtype=jnp.float32):
        init = jax.nn.initializers.normal(stddev=in_features ** -0.5)
        self.kernel = nnx.Param(init(rngs.params(), (in_features, out_features), param_dtype))
        self.bias = nnx.Param(jnp.zeros((out_features,), param_dtype)) if use_bias else None
        self.matmul = BitMatmul(weight=weight, a_bits=a_bits)

    def __call__(self, x):
        lead = x.shape[:-1]
        y = self.matmul(x.reshape(-1, x.shape[-1]), self.kernel[...]).reshape(*lead, -1)
        return y if self.bias is None else y + self.bias[...]
