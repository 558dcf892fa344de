"""ZO-AdaMU: zeroth-order SPSA with perturbations adapted by momentum and uncertainty.

Jiang et al., AAAI 2024, "ZO-AdaMU Optimizer: Adapting Perturbation by the Momentum and
Uncertainty in Zeroth-order Optimization". Instead of MeZO's fresh z ~ N(0, I), the
perturbation is itself a momentum: at step t (0-based count, annealed weights α_t, β1_t, β2_t)

    ż ~ N(0, α_t·I)                  zero-centred draw (exploration)
    z̈ ~ N(m_{t}, (1 − α_t)·I)        draw centred on the previous perturbation momentum
    m_{t+1} = β1_t·ż + (1 − β1_t)·z̈  the perturbation used this step (stored)
    v_{t+1} = β2_t·ż² + (1 − β2_t)·z̈²  its second moment (recomputed, not stored)
    p = (L(θ + ε·m_{t+1}) − L(θ − ε·m_{t+1})) / (2ε),   ĝ = p·m_{t+1}
    θ ← θ − lr·( ĝ / sqrt(v_{t+1} + σ) + wd·θ )

Choices made here, each a reading of the paper where it leaves room:
- N(μ, s) is read with s the *variance* (std sqrt(α) and sqrt(1 − α)), so ż + z̈ noise has
  unit total variance whatever α is.
- The perturbation evaluated this step is the fresh m_{t+1} (momentum relocated onto the
  perturbation, the paper's central idea); m_0 = 0.
- v is the instantaneous mix of the two squared draws (no EMA over steps), and the step
  divides by sqrt(v + σ), the Adam-style root of a second moment (σ = 1e-8 by default).
- Simulated annealing of the three weights, with progress s(t) = 0 for t < T1, a cosine ramp
  ½(1 − cos(π (t − T1)/(T2 − T1))) for T1 ≤ t < T2 and 1 afterwards (``anneal_steps=(T1, T2)``):
  α_t = 1 − s·(1 − alpha), β1_t = 1 − s·(1 − b1), β2_t = 1 − s·(1 − b2). Before T1
  (α = β1 = β2 = 1) the perturbation is MeZO's z = ż and the step is p·ż/|ż|: the momentum
  has nothing to remember yet; afterwards its share grows smoothly.
- Draws come from ``fold_in(fold_in(key, t), 0 | 1)`` per leaf (leaf index folded in last),
  so nothing but m, the key and the count is stored (one parameter-sized buffer, vs. MeZO's
  none and Adam's two).

The authors' released code departs from these equations; this file follows the equations.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from sciscale_jax.optim import _checks
from sciscale_jax.optim.mezo import gaussian_like


class ZoAdamuState(NamedTuple):
    key: jax.Array
    count: jax.Array
    m: Any   # the perturbation momentum, like params


def anneal_progress(count, t1: int, t2: int) -> jax.Array:
    """s(t) in [0, 1]: 0 before ``t1``, a cosine ramp to 1 at ``t2``, 1 afterwards."""
    t = jnp.asarray(count, jnp.float32)
    frac = jnp.clip((t - t1) / max(t2 - t1, 1), 0.0, 1.0)
    return 0.5 * (1.0 - jnp.cos(math.pi * frac))


def zo_adamu(learning_rate, eps: float = 1e-3, alpha: float = 0.5, b1: float = 0.9, b2: float = 0.9,
             anneal_steps: tuple[int, int] = (100, 1000), sigma: float = 1e-8, weight_decay: float = 0.0,
             seed: int = 0, *, mask=None) -> optax.GradientTransformationExtraArgs:
    """ZO-AdaMU as an optax transform taking the loss as ``value_fn`` (``updates`` is ignored).

    Args:
      learning_rate: a finite positive number or a schedule of the step count.
      eps: perturbation scale ε (default 1e-3).
      alpha, b1, b2: the annealed weights' end values (defaults 0.5, 0.9, 0.9).
      anneal_steps: (T1, T2) of the annealing ramp (default (100, 1000)).
      sigma: offset under the square root (default 1e-8).
      weight_decay: decoupled decay coefficient; default 0 (no decay).
      seed: seeds the draws' PRNG key (default 0).
      mask: which parameters decay, as in ``optax.adamw``: a bool pytree (a prefix of params)
        or a function params -> bool pytree; ``None`` decays every parameter.
    """
    learning_rate = _checks.learning_rate(learning_rate)
    eps = _checks.positive(eps, "eps")
    alpha = _checks.beta(alpha, "alpha", allow_one=True)
    b1, b2 = _checks.beta(b1, "b1", allow_one=True), _checks.beta(b2, "b2", allow_one=True)
    sigma = _checks.non_negative(sigma, "sigma")
    weight_decay = _checks.non_negative(weight_decay, "weight_decay")
    seed = _checks.non_negative_int(seed, "seed")
    mask = _checks.decay_mask(mask)
    if (not isinstance(anneal_steps, (tuple, list)) or len(anneal_steps) != 2
            or any(not isinstance(a, int) or a < 0 for a in anneal_steps) or anneal_steps[0] > anneal_steps[1]):
        raise ValueError(f"anneal_steps={anneal_steps!r} must be two integers 0 <= T1 <= T2")
    t1, t2 = anneal_steps

    def init(params):
        return ZoAdamuState(jax.random.PRNGKey(seed), jnp.zeros([], jnp.int32),
                            jax.tree.map(jnp.zeros_like, params))

    def update(updates, state, params=None, *, value_fn=None, **extra):
        del updates, extra
        value_fn = _checks.need_value_fn(value_fn, "zo_adamu")
        _checks.need_params(params, "zo_adamu")
        s = anneal_progress(state.count, t1, t2)
        a_t, b1_t, b2_t = 1 - s * (1 - alpha), 1 - s * (1 - b1), 1 - s * (1 - b2)
        key = jax.random.fold_in(state.key, state.count)
        n0 = gaussian_like(jax.random.fold_in(key, 0), params)
        n1 = gaussian_like(jax.random.fold_in(key, 1), params)
        z0 = jax.tree.map(lambda n: jnp.sqrt(a_t) * n, n0)
        z1 = jax.tree.map(lambda m, n: m + jnp.sqrt(1 - a_t) * n, state.m, n1)
        m = jax.tree.map(lambda a, b: (b1_t * a + (1 - b1_t) * b).astype(a.dtype), z0, z1)
        plus = value_fn(jax.tree.map(lambda p, d: (p + eps * d).astype(p.dtype), params, m))
        minus = value_fn(jax.tree.map(lambda p, d: (p - eps * d).astype(p.dtype), params, m))
        proj = (jnp.asarray(plus, jnp.float32) - jnp.asarray(minus, jnp.float32)) / (2 * eps)
        lr = _checks.lr_at(learning_rate, state.count)

        def step(p, d, a, b, decays):
            v = b2_t * a * a + (1 - b2_t) * b * b
            u = proj * d / jnp.sqrt(v + sigma)
            return (-lr * (u + weight_decay * p if decays else u)).astype(p.dtype)
        leaves, treedef = jax.tree.flatten(params)
        flags = _checks.decay_flags(mask, params) if weight_decay else [False] * len(leaves)
        new = treedef.unflatten([step(*args) for args in zip(
            leaves, treedef.flatten_up_to(m), treedef.flatten_up_to(z0), treedef.flatten_up_to(z1), flags)])
        return new, ZoAdamuState(state.key, optax.safe_int32_increment(state.count), m)

    return optax.GradientTransformationExtraArgs(init, update)
