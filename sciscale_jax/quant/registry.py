"""Quantisation and fp8 schemes by name, and the one factory models build linear layers with.

``QUANT_SCHEMES`` names what ``TransformerConfig.quant`` may say: ``"none"``,
``"llm_qat_w4a8kv4"`` (LLM-QAT, Liu et al. 2023), ``"bitnet"`` (Wang et al. 2023) and
``"bitnet158"`` (Ma et al. 2024). ``make_matmul(quant, precision)`` returns the
``matmul(x[..., k], w[k, m])`` hook for a dense layer (``None`` for a plain matmul): the
quantised matmul of the scheme, or the fp8 matmul when the precision policy asks for fp8.
``make_linear`` wraps it into a standalone NNX linear layer. ``kv_quantizer(quant)`` is what
attention applies to keys and values (``None`` when the scheme leaves them alone).

``packed_weight_bytes`` counts the bytes of the deployable weights of one matrix: packed
integers plus their scales (BitNet: 1 bit per weight; b1.58: 5 ternary digits per byte,
3**5 = 243 <= 256; n-bit schemes: n bits per weight with float16 scales/zero points).
Training itself keeps full-precision latent weights; these are inference figures.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from flax import nnx

from sciscale_jax.precision.fp8 import Fp8Matmul
from sciscale_jax.precision.policy import get_policy
from sciscale_jax.quant.bitnet import BitMatmul
from sciscale_jax.quant.fake_quant import check_bits
from sciscale_jax.quant.llm_qat import QATMatmul, quantize_kv


@dataclasses.dataclass(frozen=True)
class QuantScheme:
    name: str
    kind: str                   # "none" | "llm_qat" | "bitnet"
    w_bits: float | None = None
    a_bits: int | None = None
    kv_bits: int | None = None
    weight: str | None = None   # BitNet: "binary" | "ternary"


QUANT_SCHEMES: dict[str, QuantScheme] = {
    "none": QuantScheme("none", "none"),
    "llm_qat_w4a8kv4": QuantScheme("llm_qat_w4a8kv4", "llm_qat", w_bits=4, a_bits=8, kv_bits=4),
    "bitnet": QuantScheme("bitnet", "bitnet", w_bits=1, a_bits=8, weight="binary"),
    "bitnet158": QuantScheme("bitnet158", "bitnet", w_bits=math.log2(3), a_bits=8, weight="ternary"),
}


def get_quant_scheme(name: str | QuantScheme) -> QuantScheme:
    if isinstance(name, QuantScheme):
        return name
    if name not in QUANT_SCHEMES:
        raise ValueError(f"unknown quant scheme {name!r}; known: {sorted(QUANT_SCHEMES)}")
    return QUANT_SCHEMES[name]


def make_matmul(quant: str = "none", precision: str = "fp32", **fp8_kwargs):
    """The matmul hook for one dense layer: ``None`` (plain ``x @ w``) or an NNX module."""
    scheme, policy = get_quant_scheme(quant), get_policy(precision)
    if scheme.kind != "none" and policy.fp8:
        raise ValueError(f"quant={scheme.name!r} cannot be combined with precision fp8: the "
                         "quantised matmuls run on dequantised bf16/fp32 values")
    if scheme.kind == "llm_qat":
        return QATMatmul(w_bits=int(scheme.w_bits), a_bits=scheme.a_bits)
    if scheme.kind == "bitnet":
        return BitMatmul(weight=scheme.weight, a_bits=scheme.a_bits)
    if policy.fp8:
        return Fp8Matmul(**fp8_kwargs)
    return None


def kv_quantizer(quant: str = "none"):
    """``f(k_bshd, v_bshd) -> (k, v)`` for the scheme, or ``None``."""
    scheme = get_quant_scheme(quant)
    if scheme.kv_bits is None:
        return None
    return functools.partial(quantize_kv, bits=scheme.kv_bits)


class Linear(nnx.Module):
    """y = matmul(x, W) (+ b) with W [in, out], computed in the policy's compute dtype."""

    def __init__(self, in_features: int, out_features: int, *, rngs: nnx.Rngs, quant: str = "none",
                 precision: str = "fp32", use_bias: bool = False, **fp8_kwargs):
        for name, value in (("in_features", in_features), ("out_features", out_features)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}={value!r} must be a positive integer")
        policy = get_policy(precision)
        init = jax.nn.initializers.normal(stddev=in_features ** -0.5)
        self.kernel = nnx.Param(init(rngs.params(), (in_features, out_features), policy.param_dtype))
        self.bias = nnx.Param(jnp.zeros((out_features,), policy.param_dtype)) if use_bias else None
        self.dtype = policy.compute_dtype
        self.matmul = make_matmul(quant, precision, **fp8_kwargs)

    def __call__(self, x):
        lead = x.shape[:-1]
        x_nk = x.reshape(-1, x.shape[-1]).astype(self.dtype)
        w_km = self.kernel[...].astype(self.dtype)
        y_nm = x_nk @ w_km if self.matmul is None else self.matmul(x_nk, w_km)
        y = y_nm.reshape(*lead, y_nm.shape[-1])
        return y if self.bias is None else y + self.bias[...].astype(self.dtype)


def make_linear(quant: str, in_features: int, out_features: int, *, rngs: nnx.Rngs,
                precision: str = "fp32", use_bias: bool = False, **fp8_kwargs) -> Linear:
    return Linear(in_features, out_features, rngs=rngs, quant=quant, precision=precision,
                  use_bias=use_bias, **fp8_kwargs)


def packed_weight_bytes(scheme: str, shape: tuple[int, ...], *, bits: int = 4,
                        group_size: int = 128, float_bytes: int = 2) -> int:
    """Deployable bytes of one weight matrix ``shape`` = (in, out) under ``scheme``:
    ``"none"`` (``float_bytes`` per weight), the names of ``QUANT_SCHEMES``, or
    ``"efficient_qat"`` (``bits`` per weight, a scale and a zero point per group of
    ``group_size`` input rows per output column)."""
    n = math.prod(shape)
    out = shape[-1]
    if scheme == "efficient_qat":
        check_bits(bits)
        if shape[0] % group_size:
            raise ValueError(f"group_size={group_size} does not divide dimension {shape[0]}")
        return math.ceil(n * bits / 8) + 2 * float_bytes * (n // group_size)
    kind = get_quant_scheme(scheme)
    if kind.kind == "none":
        return n * float_bytes
    if kind.kind == "llm_qat":  # int-n weights, one float scale per output channel
        return math.ceil(n * int(kind.w_bits) / 8) + float_bytes * out
    if kind.weight == "binary":  # sign bits, one scale
        return math.ceil(n / 8) + float_bytes
    return math.ceil(n / 5) + float_bytes  # ternary, base-3 packed, one scale
