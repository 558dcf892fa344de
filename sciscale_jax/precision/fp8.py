"""FP8 matmuls for training (Micikevicius et al. 2022, "FP8 Formats for Deep Learning").

The forward pass quantises activations and weights to e4m3 (more mantissa), the backward
pass quantises the incoming gradient to e5m2 (more range); each tensor has one float32
scale, with ``x ~= q * scale`` and ``q = fp8(clip(x / scale, -fmax, fmax))``. The matmul
runs on the fp8 operands with float32 accumulation and multiplies by the two scales; the
fp8 copies (one byte per element) are what the backward pass keeps.

Two scaling recipes, as in NVIDIA Transformer Engine:

- ``"delayed"``: each tensor is quantised with the scale stored from earlier steps. After
  the step its amax is pushed onto an amax history (newest first, default length 1024) and
  the next scale is ``2**margin * max(history) / fmax`` (kept unchanged while the
  history's max is zero or not finite; a non-finite amax is recorded as 0).
- ``"current"``: the scale is ``2**margin * amax(tensor) / fmax`` of the tensor itself;
  the history is still kept, for inspection.

Scales and histories live in ``Fp8Meta`` variables. The op is a ``jax.custom_vjp`` whose
"gradient" for each of them is its new value (the trick of Flax Linen's fp8 ops, whose
support is Linen-only). The train step differentiates with respect to ``nnx.Param`` and
``Fp8Meta`` together, then ``apply_fp8_meta(model, grads)`` writes the new values into the
model and returns the parameter gradients alone, so the optimizer never touches them. Each
``Fp8Matmul`` must run once per differentiated step: a second call would sum two "new
values" (under gradient accumulation keep the last micro-step's values, do not sum them).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, traverse_util

from sciscale_jax.pure import combine, partition

E4M3 = np.dtype(jnp.float8_e4m3fn)
E5M2 = np.dtype(jnp.float8_e5m2)
SCALINGS = ("delayed", "current")
_FP8 = {np.dtype(d) for d in (jnp.float8_e4m3fn, jnp.float8_e5m2, jnp.float8_e4m3fnuz,
                              jnp.float8_e5m2fnuz)}
_OPERAND = {np.dtype(d) for d in (jnp.float32, jnp.bfloat16, jnp.float16)}


class Fp8Meta(nnx.Variable):
    """An fp8 scale or amax history: updated from the backward pass, not by the optimizer."""


@dataclasses.dataclass(frozen=True)
class Fp8Config:
    scaling: str = "delayed"
    history_len: int = 1024
    margin: float = 0.0
    fwd_dtype: Any = E4M3
    bwd_dtype: Any = E5M2

    def __post_init__(self):
        if self.scaling not in SCALINGS:
            raise ValueError(f"unknown fp8 scaling {self.scaling!r}; known: {list(SCALINGS)}")
        if int(self.history_len) != self.history_len or self.history_len < 1:
            raise ValueError(f"history_len={self.history_len} must be a positive integer")
        for field in ("fwd_dtype", "bwd_dtype"):
            dt = np.dtype(getattr(self, field))
            if dt not in _FP8:
                raise ValueError(f"{field}={dt.name} is not an fp8 dtype; use float8_e4m3fn "
                                 "(forward) and float8_e5m2 (backward)")
            object.__setattr__(self, field, dt)


def fp8_max(dtype) -> float:
    return float(jnp.finfo(dtype).max)


def quantize(x, scale, dtype):
    """fp8 value ``q`` with ``q * scale ~= x`` (saturating at the format's max)."""
    fmax = fp8_max(dtype)
    return jnp.clip(x.astype(jnp.float32) / scale, -fmax, fmax).astype(dtype)


def dequantize(q, scale, dtype=jnp.float32):
    return (q.astype(jnp.float32) * scale).astype(dtype)


def scale_from_amax(amax, fmax: float, margin: float):
    return (2.0 ** margin) * amax / fmax


def _amax(x):
    a = jnp.max(jnp.abs(x.astype(jnp.float32)))
    return jnp.where(jnp.isfinite(a), a, 0.0)


def _scale_and_update(cfg: Fp8Config, x, scale, history, dtype):
    """The scale to quantise ``x`` with now, and the (scale, history) to store."""
    fmax = fp8_max(dtype)
    amax = _amax(x)
    new_history = jnp.concatenate([amax[None], history[:-1]])
    if cfg.scaling == "current":
        use = jnp.where(amax > 0, scale_from_amax(amax, fmax, cfg.margin), scale)
        return use, use, new_history
    hmax = jnp.max(new_history)
    new_scale = jnp.where(hmax > 0, scale_from_amax(hmax, fmax, cfg.margin), scale)
    return scale, new_scale, new_history


_DN = (((1,), (0,)), ((), ()))       # x[n,k] . w[k,m]
_DN_DX = (((1,), (1,)), ((), ()))    # g[n,m] . w[k,m] -> [n,k]
_DN_DW = (((0,), (0,)), ((), ()))    # x[n,k] . g[n,m] -> [k,m]


def _dot(a, b, dn):
    return jax.lax.dot_general(a, b, dn, preferred_element_type=jnp.float32)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def fp8_matmul(cfg: Fp8Config, x_nk, w_km, meta):
    """y[n,m] = x[n,k] . w[k,m] with fp8 operands; ``meta`` = (x_scale, x_history,
    w_scale, w_history, g_scale, g_history). Its cotangent is the updated ``meta``."""
    return _fwd(cfg, x_nk, w_km, meta)[0]


def _fwd(cfg, x_nk, w_km, meta):
    x_scale, x_hist, w_scale, w_hist, g_scale, g_hist = meta
    sx, new_sx, new_xh = _scale_and_update(cfg, x_nk, x_scale, x_hist, cfg.fwd_dtype)
    sw, new_sw, new_wh = _scale_and_update(cfg, w_km, w_scale, w_hist, cfg.fwd_dtype)
    xq_nk = quantize(x_nk, sx, cfg.fwd_dtype)
    wq_km = quantize(w_km, sw, cfg.fwd_dtype)
    y_nm = (_dot(xq_nk, wq_km, _DN) * (sx * sw)).astype(x_nk.dtype)
    res = (xq_nk, wq_km, sx, sw, new_sx, new_xh, new_sw, new_wh, g_scale, g_hist,
           jnp.zeros((0,), x_nk.dtype), jnp.zeros((0,), w_km.dtype))
    return y_nm, res


def _bwd(cfg, res, g_nm):
    xq_nk, wq_km, sx, sw, new_sx, new_xh, new_sw, new_wh, g_scale, g_hist, x0, w0 = res
    sg, new_sg, new_gh = _scale_and_update(cfg, g_nm, g_scale, g_hist, cfg.bwd_dtype)
    gq_nm = quantize(g_nm, sg, cfg.bwd_dtype)
    dx_nk = (_dot(gq_nm, wq_km, _DN_DX) * (sg * sw)).astype(x0.dtype)
    dw_km = (_dot(xq_nk, gq_nm, _DN_DW) * (sx * sg)).astype(w0.dtype)
    return dx_nk, dw_km, (new_sx, new_xh, new_sw, new_wh, new_sg, new_gh)


fp8_matmul.defvjp(_fwd, _bwd)


class Fp8Matmul(nnx.Module):
    """The ``matmul(x[..., k], w[k, m])`` hook of a dense layer, in fp8, with its scales."""

    def __init__(self, *, scaling: str = "delayed", history_len: int = 1024, margin: float = 0.0,
                 fwd_dtype=E4M3, bwd_dtype=E5M2):
        self.cfg = Fp8Config(scaling, history_len, margin, fwd_dtype, bwd_dtype)
        for role in ("x", "w", "g"):
            setattr(self, f"{role}_scale", Fp8Meta(jnp.ones((), jnp.float32)))
            setattr(self, f"{role}_amax_history", Fp8Meta(jnp.zeros((history_len,), jnp.float32)))

    def __call__(self, x, w_km):
        for name, t, ok in (("x", x, x.ndim >= 1), ("w", w_km, w_km.ndim == 2)):
            if not ok or np.dtype(t.dtype) not in _OPERAND:
                raise ValueError(f"fp8 matmul needs a float32/bfloat16/float16 x[..., k] and "
                                 f"w[k, m]; got {name} of shape {t.shape} dtype {np.dtype(t.dtype).name}")
        if x.shape[-1] != w_km.shape[0]:
            raise ValueError(f"fp8 matmul: x {x.shape} and w {w_km.shape} do not contract")
        meta = tuple(getattr(self, f"{r}_{k}")[...] for r in "xwg" for k in ("scale", "amax_history"))
        y_nm = fp8_matmul(self.cfg, x.reshape(-1, x.shape[-1]), w_km, meta)
        return y_nm.reshape(*x.shape[:-1], w_km.shape[1])


class Fp8Linear(nnx.Module):
    """y = x . W (+ b) through ``Fp8Matmul``; ``x`` is cast to ``dtype`` (the compute dtype)."""

    def __init__(self, in_features: int, out_features: int, *, rngs: nnx.Rngs, use_bias: bool = False,
                 dtype=jnp.bfloat16, param_dtype=jnp.float32, **fp8_kwargs):
        init = jax.nn.initializers.normal(stddev=in_features ** -0.5)
        self.kernel = nnx.Param(init(rngs.params(), (in_features, out_features), param_dtype))
        self.bias = nnx.Param(jnp.zeros((out_features,), param_dtype)) if use_bias else None
        self.dtype = dtype
        self.matmul = Fp8Matmul(**fp8_kwargs)

    def __call__(self, x):
        y = self.matmul(x.astype(self.dtype), self.kernel[...].astype(self.dtype))
        return y if self.bias is None else y + self.bias[...].astype(self.dtype)


# The filter a train step differentiates with: parameters and fp8 metadata together.
PARAMS_AND_FP8 = nnx.Any(nnx.Param, Fp8Meta)


def apply_fp8_meta(model: nnx.Module, grads: nnx.State) -> nnx.State:
    """Write the new scales/histories (the ``Fp8Meta`` part of ``grads``) into ``model``;
    return the gradients of everything else (what the optimizer should see)."""
    meta, rest = nnx.split_state(grads, Fp8Meta, ...)
    nnx.update(model, meta)
    return rest


# --- For train steps that keep model state as pure dicts (params, rest) -------------------

def fp8_paths(model: nnx.Module) -> frozenset[tuple]:
    """Paths of the ``Fp8Meta`` variables of ``model`` (as in ``nnx.to_pure_dict``)."""
    return frozenset(traverse_util.flatten_dict(nnx.to_pure_dict(nnx.state(model, Fp8Meta))))


def split_pure(rest: dict, paths: frozenset[tuple]) -> tuple[dict, dict]:
    """``rest`` (a nested pure dict) cut into (entries at ``paths``, the others)."""
    return partition(rest, paths.__contains__)


def fp8_grad_fn(graphdef, loss_fn, paths: frozenset[tuple]):
    """``grad_fn(params, rest, batch, key, loss_scale=1.0) -> (loss, (count, new_rest), grads)``
    that also differentiates the fp8 metadata in ``rest`` (at ``paths``) and puts its
    "gradients" -- the new scales and histories -- into ``new_rest``; ``grads`` holds
    parameters only. ``loss_fn(model, batch, key) -> (token sum, token count)``. The loss is
    multiplied by ``loss_scale`` before differentiating (pass ``loss_scale_of(opt_state)``);
    the returned loss is unscaled, the gradients are not (``dynamic_loss_scaling`` unscales)."""

    def objective(params, fp8, other, batch, key, scale):
        model = nnx.merge(graphdef, params, combine(other, fp8))
        total, count = loss_fn(model, batch, key)
        new_rest = nnx.to_pure_dict(nnx.split(model, nnx.Param, ...)[2])
        loss = total / jnp.maximum(count, 1.0)
        return loss * scale, (loss, count, new_rest)

    def grad_fn(params, rest, batch, key, loss_scale=1.0):
        fp8, other = split_pure(rest, paths)
        scale = jnp.asarray(loss_scale, jnp.float32)
        (_, (loss, count, new_rest)), (grads, new_fp8) = jax.value_and_grad(
            objective, argnums=(0, 1), has_aux=True)(params, fp8, other, batch, key, scale)
        return loss, (count, combine(new_rest, new_fp8)), grads

    return grad_fn
