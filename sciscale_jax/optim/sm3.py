"""SM3: Square-root Memory-efficient, Minimum-based optimiser (Anil et al., NeurIPS 2019).

Adagrad with its accumulator compressed to one cover per tensor axis. For an array with
ndim >= 2 the state keeps one vector per axis; each step

    ν_i = b2' · min_a μ_a[i_a] + (1−b2) · g_i²        (b2' = b2, and 1−b2 read as 1 when b2 = 1)
    u_i = g_i / sqrt(ν_i + eps)   (0 where ν_i = 0)
    μ_a[j] = max_{i: i_a = j} ν_i
    m ← b1·m + (1−b1)·u,   θ ← θ − lr·m

(SM3-II of the paper; b2 = 1 is the paper's accumulate-forever form). Vectors and scalars
have a single cover per element, i.e. plain Adagrad there. State is kept in float32.

What differs from ``optax.sm3``: this factory takes a schedule for ``learning_rate``,
exposes ``b2`` and ``eps`` (optax fixes eps = 1e-8 inside ``scale_by_sm3``; the default here
is 1e-30), handles scalar parameters (``optax.sm3`` indexes an empty per-axis list and raises
IndexError on them) and keeps its state in float32. The arithmetic is otherwise the same
(checked against ``optax.sm3`` in the tests).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from sciscale_jax.optim import _checks


class Sm3State(NamedTuple):
    count: jax.Array
    accum: Any   # per leaf: a tuple of per-axis vectors for ndim >= 2, else a full array
    mu: Any      # momentum, like params


def sm3(learning_rate, b1: float = 0.9, b2: float = 1.0, eps: float = 1e-30) -> optax.GradientTransformation:
    """SM3 as an optax transform; ``b2`` lies in [0, 1] (1: accumulate without decay)."""
    learning_rate = _checks.learning_rate(learning_rate)
    b1 = _checks.beta(b1, "b1")
    b2 = _checks.beta(b2, "b2", allow_one=True)
    eps = _checks.non_negative(eps, "eps")
    new_coeff = 1.0 if b2 == 1.0 else 1.0 - b2

    def init(params):
        accum = jax.tree.map(lambda p: tuple(jnp.zeros([s], jnp.float32) for s in p.shape) if p.ndim >= 2
                             else jnp.zeros(p.shape, jnp.float32), params)
        return Sm3State(jnp.zeros([], jnp.int32), accum, jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params))

    def leaf(g, acc):
        g = g.astype(jnp.float32)
        if g.ndim >= 2:
            covers = [a.reshape([1] * i + [-1] + [1] * (g.ndim - i - 1)) for i, a in enumerate(acc)]
            prev = covers[0]
            for c in covers[1:]:
                prev = jnp.minimum(prev, c)
        else:
            prev = acc
        nu = b2 * prev + new_coeff * g * g
        u = jnp.where(nu > 0, g * jax.lax.rsqrt(nu + eps), 0.0)
        if g.ndim >= 2:
            new = tuple(jnp.max(nu, axis=tuple(j for j in range(g.ndim) if j != i)) for i in range(g.ndim))
        else:
            new = nu
        return u, new

    def update(updates, state, params=None):
        del params
        treedef = jax.tree.structure(updates)
        out = [leaf(g, a) for g, a in zip(treedef.flatten_up_to(updates), treedef.flatten_up_to(state.accum))]
        u = treedef.unflatten([o[0] for o in out])
        accum = treedef.unflatten([o[1] for o in out])
        mu = jax.tree.map(lambda m, x: b1 * m + (1 - b1) * x, state.mu, u)
        lr = _checks.lr_at(learning_rate, state.count)
        new = jax.tree.map(lambda m, g: (-lr * m).astype(g.dtype), mu, updates)
        return new, Sm3State(optax.safe_int32_increment(state.count), accum, mu)

    return optax.GradientTransformation(init, update)
