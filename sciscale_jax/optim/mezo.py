"""MeZO: memory-efficient zeroth-order SGD (Malladi et al., NeurIPS 2023).

SPSA with Gaussian directions. At step t, for sample s = 1..n, a direction z_s (one
standard-normal draw per leaf, from ``fold_in(fold_in(fold_in(key, t), s), leaf)``) is
generated, the loss is evaluated at θ + εz_s and θ − εz_s, and

    p_s = (L(θ + εz_s) − L(θ − εz_s)) / (2ε)            (the projected gradient)
    θ ← θ − lr·( (1/n)·Σ_s p_s·z_s + wd·θ )               (n-SPSA when n > 1)

z is never stored: it is regenerated from the key, leaf by leaf, wherever it is needed, so
the state is only a PRNG key and a step count. The transform is an
``optax.GradientTransformationExtraArgs``: call ``update(None, state, params,
value_fn=loss_fn)``; ``updates`` is ignored. In E[z zᵀ] = I, so E[p·z] → ∇L as ε → 0
(exactly for a quadratic).

The optax form must return an update next to the parameters it applies to, so it holds a
perturbed copy of the parameters while the loss runs. ``MezoTransformation.apply`` is the
paper's Algorithm 1 instead: θ is perturbed in place (+εz, −2εz, +εz), then updated in place,
so with the parameter buffers donated the step needs no parameter-sized buffer beyond θ
itself. Restoring θ by adding εz back is exact only up to float rounding, as in the paper.
``sciscale_jax.train``'s zeroth-order step uses ``apply`` when the transform has it.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

from sciscale_jax.optim import _checks


class MezoState(NamedTuple):
    key: jax.Array
    count: jax.Array


class MezoTransformation(optax.GradientTransformationExtraArgs):
    """``mezo``'s optax transform, plus ``apply(params, state, value_fn) -> (params, state, loss, projections)``.

    ``apply`` performs the whole step on the parameters in place (see the module docstring);
    ``loss`` is L(θ) before the step and ``projections`` are the [num_samples] p_s.
    """

    def __new__(cls, init, update, apply: Callable):
        self = super().__new__(cls, init, update)
        self.apply = apply
        return self


def _normal_leaf(key: jax.Array, i: int, p: jax.Array) -> jax.Array:
    return jax.random.normal(jax.random.fold_in(key, i), p.shape, jnp.float32).astype(p.dtype)


def gaussian_like(key: jax.Array, params: Any) -> Any:
    """One standard-normal draw per leaf, shaped and typed like it, from ``fold_in(key, leaf index)``."""
    leaves, treedef = jax.tree.flatten(params)
    return treedef.unflatten([_normal_leaf(key, i, p) for i, p in enumerate(leaves)])


def axpy(a, x: Any, y: Any) -> Any:
    """y + a·x leaf by leaf, in y's dtype."""
    return jax.tree.map(lambda xi, yi: (yi + a * xi).astype(yi.dtype), x, y)


def perturb(params: Any, key: jax.Array, scale, *more) -> Any:
    """θ + scale·z with z = ``gaussian_like(key, θ)`` drawn leaf by leaf (no whole-tree z).

    ``more`` adds further (key, scale) pairs in the same pass over each leaf.
    """
    pairs = [(key, scale), *zip(more[::2], more[1::2])]
    leaves, treedef = jax.tree.flatten(params)
    return treedef.unflatten([(p + sum(c * _normal_leaf(k, i, p) for k, c in pairs)).astype(p.dtype)
                              for i, p in enumerate(leaves)])


def _difference(plus, minus, eps: float) -> jax.Array:
    return (jnp.asarray(plus, jnp.float32) - jnp.asarray(minus, jnp.float32)) / (2 * eps)


def _loop(n: int, body, carry):
    """``fori_loop(0, n, body, carry)``, written out when n = 1 (no loop for XLA to carry buffers through)."""
    return body(0, carry) if n == 1 else jax.lax.fori_loop(0, n, body, carry)


def spsa_projections(value_fn, params, key, eps: float, num_samples: int) -> jax.Array:
    """[num_samples] projected gradients (L(θ+εz_s) − L(θ−εz_s)) / 2ε, one direction at a time."""
    def one(s, out):
        k = jax.random.fold_in(key, s)
        plus = value_fn(perturb(params, k, eps))
        minus = value_fn(perturb(params, k, -eps))
        return out.at[s].set(_difference(plus, minus, eps))
    return _loop(num_samples, one, jnp.zeros([num_samples], jnp.float32))


def _sequenced(*xs):
    """Pin evaluation order: everything in ``xs`` is computed before anything that uses the result."""
    return jax.lax.optimization_barrier(xs)


def mezo(learning_rate, eps: float = 1e-3, num_samples: int = 1, weight_decay: float = 0.0,
         seed: int = 0, *, mask=None) -> MezoTransformation:
    """MeZO / n-SPSA as an optax transform taking the loss as ``value_fn``.

    Args:
      learning_rate: a finite positive number or a schedule of the step count.
      eps: perturbation scale ε (default 1e-3, the paper's).
      num_samples: directions per step n (default 1).
      weight_decay: decoupled decay coefficient; default 0 (no decay).
      seed: seeds the directions' PRNG key (default 0).
      mask: which parameters decay, as in ``optax.adamw``: a bool pytree (a prefix of params)
        or a function params -> bool pytree; ``None`` decays every parameter.
    """
    learning_rate = _checks.learning_rate(learning_rate)
    eps = _checks.positive(eps, "eps")
    num_samples = _checks.positive_int(num_samples, "num_samples")
    weight_decay = _checks.non_negative(weight_decay, "weight_decay")
    seed = _checks.non_negative_int(seed, "seed")
    mask = _checks.decay_mask(mask)

    def decayed(params, fn, other):
        """``fn(p)`` on the leaves that decay, ``other(p)`` on the rest."""
        leaves, treedef = jax.tree.flatten(params)
        flags = _checks.decay_flags(mask, params) if weight_decay else [False] * len(leaves)
        return treedef.unflatten([fn(p) if d else other(p) for p, d in zip(leaves, flags)])

    def init(params):
        del params
        return MezoState(jax.random.PRNGKey(seed), jnp.zeros([], jnp.int32))

    def next_state(state):
        return MezoState(state.key, optax.safe_int32_increment(state.count))

    def update(updates, state, params=None, *, value_fn=None, **extra):
        del updates, extra
        value_fn = _checks.need_value_fn(value_fn, "mezo")
        _checks.need_params(params, "mezo")
        key = jax.random.fold_in(state.key, state.count)
        proj = spsa_projections(value_fn, params, key, eps, num_samples)
        lr = _checks.lr_at(learning_rate, state.count)
        # The update is formed leaf by leaf from the regenerated z: no separate accumulator.
        new = decayed(params, lambda p: (-lr * weight_decay * p).astype(p.dtype), jnp.zeros_like)

        def add(s, acc):
            return perturb(acc, jax.random.fold_in(key, s), -lr * proj[s] / num_samples)
        return _loop(num_samples, add, new), next_state(state)

    def apply(params, state, value_fn):
        value_fn = _checks.need_value_fn(value_fn, "mezo")
        key = jax.random.fold_in(state.key, state.count)
        lr = _checks.lr_at(learning_rate, state.count)

        # Evaluation j = 0 is L(θ); j = 2s+1 is L(θ+εz_s), j = 2s+2 is L(θ−εz_s). One loss per loop
        # iteration, so every forward pass runs in the same loop body and reuses its buffers.
        # The sample index is computed from j, so XLA cannot hoist z (a whole-tree draw) out.
        def evaluate(j, carry):
            theta, losses = carry
            s = jnp.maximum((j - 1) // 2, 0)
            plus = j % 2 == 1
            restore = jnp.where(plus & (j >= 3), eps, 0.0)          # back from θ−εz_{s−1}
            move = jnp.where(j == 0, 0.0, jnp.where(plus, eps, -2 * eps))
            back = (jax.random.fold_in(key, jnp.maximum(s - 1, 0)), restore) if num_samples > 1 else ()
            theta = perturb(theta, jax.random.fold_in(key, s), move, *back)
            return theta, losses.at[j].set(jnp.asarray(value_fn(theta), jnp.float32))

        theta, losses = jax.lax.fori_loop(0, 2 * num_samples + 1, evaluate,
                                          (params, jnp.zeros([2 * num_samples + 1], jnp.float32)))
        theta = perturb(theta, jax.random.fold_in(key, num_samples - 1), eps)   # θ restored
        proj = _difference(losses[1::2], losses[2::2], eps)
        theta = decayed(theta, lambda p: (p * (1 - lr * weight_decay)).astype(p.dtype), lambda p: p)

        def descend(s, th):
            return perturb(th, jax.random.fold_in(key, s), -lr * proj[s] / num_samples)
        return _loop(num_samples, descend, theta), next_state(state), losses[0], proj

    return MezoTransformation(init, update, apply)
