"""MeZO: memory-efficient zeroth-order SGD (Malladi et al., NeurIPS 2023).

SPSA with Gaussian directions. At step t, for sample s = 1..n, a direction z_s (one
standard-normal draw per leaf, from ``fold_in(fold_in(fold_in(key, t), s), leaf)``) is
generated, the loss is evaluated at θ + εz_s and θ − εz_s, and

    p_s = (L(θ + εz_s) − L(θ − εz_s)) / (2ε)            (the projected gradient)
    θ ← θ − lr·( (1/n)·Σ_s p_s·z_s + wd·θ )               (n-SPSA when n > 1)

z is never stored: it is regenerated from the key when the update is formed, so the state
is only a PRNG key and a step count. The transform is an
``optax.GradientTransformationExtraArgs``: call ``update(None, state, params,
value_fn=loss_fn)``; ``updates`` is ignored. In E[z zᵀ] = I, so E[p·z] → ∇L as ε → 0
(exactly for a quadratic).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from sciscale_jax.optim import _checks


class MezoState(NamedTuple):
    key: jax.Array
    count: jax.Array


def gaussian_like(key: jax.Array, params: Any) -> Any:
    """One standard-normal draw per leaf, shaped and typed like it, from ``fold_in(key, leaf index)``."""
    leaves, treedef = jax.tree.flatten(params)
    z = [jax.random.normal(jax.random.fold_in(key, i), p.shape, jnp.float32).astype(p.dtype)
         for i, p in enumerate(leaves)]
    return treedef.unflatten(z)


def axpy(a, x: Any, y: Any) -> Any:
    """y + a·x leaf by leaf, in y's dtype."""
    return jax.tree.map(lambda xi, yi: (yi + a * xi).astype(yi.dtype), x, y)


def spsa_projections(value_fn, params, key, eps: float, num_samples: int) -> jax.Array:
    """[num_samples] projected gradients (L(θ+εz_s) − L(θ−εz_s)) / 2ε, one direction at a time."""
    def one(s, out):
        z = gaussian_like(jax.random.fold_in(key, s), params)
        plus = value_fn(axpy(eps, z, params))
        minus = value_fn(axpy(-eps, z, params))
        return out.at[s].set((jnp.asarray(plus, jnp.float32) - jnp.asarray(minus, jnp.float32)) / (2 * eps))
    return jax.lax.fori_loop(0, num_samples, one, jnp.zeros([num_samples], jnp.float32))


def mezo(learning_rate, eps: float = 1e-3, num_samples: int = 1, weight_decay: float = 0.0,
         seed: int = 0) -> optax.GradientTransformationExtraArgs:
    """MeZO / n-SPSA as an optax transform taking the loss as ``value_fn``."""
    learning_rate = _checks.learning_rate(learning_rate)
    eps = _checks.positive(eps, "eps")
    num_samples = _checks.positive_int(num_samples, "num_samples")
    weight_decay = _checks.non_negative(weight_decay, "weight_decay")
    seed = _checks.non_negative_int(seed, "seed")

    def init(params):
        del params
        return MezoState(jax.random.PRNGKey(seed), jnp.zeros([], jnp.int32))

    def update(updates, state, params=None, *, value_fn=None, **extra):
        del updates, extra
        value_fn = _checks.need_value_fn(value_fn, "mezo")
        _checks.need_params(params, "mezo")
        key = jax.random.fold_in(state.key, state.count)
        proj = spsa_projections(value_fn, params, key, eps, num_samples)
        lr = _checks.lr_at(learning_rate, state.count)

        def add(s, acc):
            z = gaussian_like(jax.random.fold_in(key, s), params)
            return axpy(proj[s] / num_samples, z, acc)
        grad = jax.lax.fori_loop(0, num_samples, add, jax.tree.map(jnp.zeros_like, params))
        new = jax.tree.map(lambda g, p: (-lr * (g + weight_decay * p)).astype(p.dtype), grad, params)
        return new, MezoState(state.key, optax.safe_int32_increment(state.count))

    return optax.GradientTransformationExtraArgs(init, update)
