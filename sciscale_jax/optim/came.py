"""CAME: Confidence-guided Adaptive Memory Efficient optimisation (Luo et al., ACL 2023).

Follows the authors' reference implementation. For an array with ndim >= 2 the second moment
of g² + eps1 is factored over the last two dimensions (an EMA of its row means and of its
column means; leading dimensions are kept), as in Adafactor. The preconditioned update
u = g / sqrt(v̂) is divided by max(1, RMS(u) / clip_threshold); the first moment m is an EMA
of the clipped u; the "instability" (u − m)² + eps2 gets its own factored EMA with b3, and
the step is m scaled by the inverse square root of that confidence estimate. Arrays with
ndim < 2 keep an unfactored second moment and step along m directly (no confidence term).
No bias correction. Weight decay is decoupled: θ ← θ − lr·(step + wd·θ). Statistics are
computed and kept in float32 whatever the parameter dtype (b3 = 0.9999 is invisible in bf16).

Optax has no CAME, so this file writes it; state is O(m + n) per matrix besides the
first moment, about half of AdamW's.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from sciscale_jax.optim import _checks


class Factored(NamedTuple):
    """EMAs of the row means ([..., rows]) and column means ([..., cols]) of a matrix statistic."""

    row: jax.Array
    col: jax.Array


class CameState(NamedTuple):
    count: jax.Array
    mu: Any        # first moment, like params
    nu: Any        # per leaf: Factored for ndim >= 2, else a full array
    conf: Any      # per leaf: Factored for ndim >= 2, else None (no confidence term)


def _factored_init(p):
    return Factored(jnp.zeros(p.shape[:-1], jnp.float32), jnp.zeros(p.shape[:-2] + p.shape[-1:], jnp.float32))


def _zeros32(p):
    return jnp.zeros(p.shape, jnp.float32)


def _ema_factored(f: Factored, x, decay):
    return Factored(decay * f.row + (1 - decay) * jnp.mean(x, axis=-1),
                    decay * f.col + (1 - decay) * jnp.mean(x, axis=-2))


def _inv_sqrt_approx(f: Factored):
    """rsqrt of the rank-1 reconstruction row ⊗ col / mean(row)."""
    r = jax.lax.rsqrt(f.row / jnp.mean(f.row, axis=-1, keepdims=True))[..., :, None]
    c = jax.lax.rsqrt(f.col)[..., None, :]
    return r * c


def came(learning_rate, b1: float = 0.9, b2: float = 0.999, b3: float = 0.9999,
         eps1: float = 1e-30, eps2: float = 1e-16, clip_threshold: float = 1.0,
         weight_decay: float = 0.0, *, mask=None) -> optax.GradientTransformation:
    """CAME as an optax transform.

    Args:
      learning_rate: a finite positive number or a schedule of the step count.
      b1, b2, b3: decays of the first moment, the second moment and the confidence term
        (defaults 0.9, 0.999, 0.9999, the authors').
      eps1, eps2: offsets added to g² and to the instability (defaults 1e-30, 1e-16).
      clip_threshold: bound on RMS(u) (default 1).
      weight_decay: decoupled decay coefficient; default 0 (no decay).
      mask: which parameters decay, as in ``optax.adamw``: a bool pytree (a prefix of params)
        or a function params -> bool pytree; ``None`` decays every parameter.
    """
    learning_rate = _checks.learning_rate(learning_rate)
    b1, b2, b3 = (_checks.beta(v, n) for v, n in ((b1, "b1"), (b2, "b2"), (b3, "b3")))
    eps1, eps2 = _checks.non_negative(eps1, "eps1"), _checks.non_negative(eps2, "eps2")
    clip_threshold = _checks.positive(clip_threshold, "clip_threshold")
    weight_decay = _checks.non_negative(weight_decay, "weight_decay")
    mask = _checks.decay_mask(mask)

    def init(params):
        mu = jax.tree.map(_zeros32, params)
        nu = jax.tree.map(lambda p: _factored_init(p) if p.ndim >= 2 else _zeros32(p), params)
        conf = jax.tree.map(lambda p: _factored_init(p) if p.ndim >= 2 else None, params)
        return CameState(jnp.zeros([], jnp.int32), mu, nu, conf)

    def leaf(g, m, v, c):
        g = g.astype(jnp.float32)
        sq = g * g + eps1
        if g.ndim >= 2:
            v = _ema_factored(v, sq, b2)
            u = g * _inv_sqrt_approx(v)
        else:
            v = b2 * v + (1 - b2) * sq
            u = g * jax.lax.rsqrt(v)
        rms = jnp.sqrt(jnp.mean(u * u))
        u = u / jnp.maximum(1.0, rms / clip_threshold)
        m = b1 * m + (1 - b1) * u
        if g.ndim >= 2:
            c = _ema_factored(c, (u - m) ** 2 + eps2, b3)
            step = m * _inv_sqrt_approx(c)
        else:
            step = m
        return step, m, v, c

    def update(updates, state, params=None):
        if weight_decay:
            _checks.need_params(params, "came(weight_decay > 0)")
        lr = _checks.lr_at(learning_rate, state.count)
        treedef = jax.tree.structure(updates)
        out = [leaf(g, m, v, c) for g, m, v, c in zip(
            treedef.flatten_up_to(updates), treedef.flatten_up_to(state.mu),
            treedef.flatten_up_to(state.nu), treedef.flatten_up_to(state.conf))]
        steps, mu, nu, conf = (treedef.unflatten(x) for x in zip(*out)) if out else (updates,) * 4
        if weight_decay:
            flat = [s + weight_decay * p.astype(jnp.float32) if d else s for s, p, d in zip(
                treedef.flatten_up_to(steps), treedef.flatten_up_to(params), _checks.decay_flags(mask, params))]
            steps = treedef.unflatten(flat)
        new = jax.tree.map(lambda s, g: (-lr * s).astype(g.dtype), steps, updates)
        return new, CameState(optax.safe_int32_increment(state.count), mu, nu, conf)

    return optax.GradientTransformation(init, update)
