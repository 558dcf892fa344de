"""DeepZero: coordinate-wise zeroth-order training with sparsity (Chen et al., ICLR 2024).

"DeepZero: Scaling up Zeroth-Order Optimization for Deep Model Training". The gradient is
estimated coordinate by coordinate (CGE) with forward differences, but only over the
coordinates a sparsity mask keeps:

    ĝ_i = (L(θ + μ·e_i) − L(θ)) / μ   for i in the mask,   ĝ_i = 0 otherwise
    θ ← θ − lr·(b + wd·θ),   b ← momentum·b + ĝ  (plain ZO-SGD when momentum = 0)

Sparsity is layer-wise: leaf l keeps k_l = max(1, round(d_l·n_l)) of its n_l coordinates,
with the densities d_l either uniform or from :func:`zo_grasp_densities`, the paper's
zeroth-order GraSP: the GraSP score −θ ⊙ Hg (Wang et al. 2020) with g and the
Hessian-gradient product Hg estimated from losses alone (randomised forward-difference
gradient estimates at θ and at θ + δ·ĝ with shared directions); the globally lowest-scoring
``density`` fraction is kept (GraSP prunes the highest scores) and only the resulting
per-layer ratios are used. Within a leaf the kept coordinates are drawn at random and
reshuffled every ``reshuffle_every`` steps (they come from ``fold_in(key, count // K)``,
so no mask is stored). The perturbed losses of a leaf's coordinates are evaluated in
batches of ``chunk_size`` with ``jax.lax.map(..., batch_size=...)`` (vmap), the JAX form of
the paper's forward parallelisation; the paper's feature reuse is model-specific and not
done here. A step costs 1 + Σ_l k_l loss evaluations.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from sciscale_jax.optim import _checks
from sciscale_jax.optim.mezo import axpy, gaussian_like


class DeepZeroState(NamedTuple):
    key: jax.Array
    count: jax.Array
    buf: Any   # momentum buffer like params, or () when momentum = 0


def _densities(params, density, layer_density) -> list[float]:
    leaves, treedef = jax.tree.flatten(params)
    if layer_density is None:
        return [density] * len(leaves)
    try:
        dens = treedef.flatten_up_to(layer_density)
    except (ValueError, TypeError) as err:
        raise ValueError(f"layer_density must be laid out like params ({treedef}): {err}") from None
    for d in dens:
        if not isinstance(d, (int, float)) or not 0.0 < d <= 1.0:
            raise ValueError(f"layer_density holds {d!r}; every density must lie in (0, 1]")
    return [float(d) for d in dens]


def kept_counts(params, density: float = 0.05, layer_density=None) -> list[int]:
    """Coordinates kept per leaf (in ``jax.tree.leaves`` order): max(1, round(d_l · n_l))."""
    return [max(1, int(round(d * int(np.prod(p.shape))))) for p, d in
            zip(jax.tree.leaves(params), _densities(params, density, layer_density))]


def mask_indices(key, count, params, kept: list[int], reshuffle_every: int) -> list[jax.Array]:
    """Flat indices kept per leaf at step ``count`` (fixed within each window of K steps)."""
    mkey = jax.random.fold_in(key, count // reshuffle_every)
    return [jax.random.choice(jax.random.fold_in(mkey, i), int(np.prod(p.shape)), (k,), replace=False)
            for i, (p, k) in enumerate(zip(jax.tree.leaves(params), kept))]


def coordinate_estimate(value_fn, params, indices: list[jax.Array], mu: float, chunk_size: int) -> Any:
    """Sparse forward-difference CGE: ĝ_i = (L(θ + μ e_i) − L(θ)) / μ on the given indices."""
    leaves, treedef = jax.tree.flatten(params)
    base = jnp.asarray(value_fn(params), jnp.float32)
    grads = []
    for l, (p, idx) in enumerate(zip(leaves, indices)):
        def loss_at(i, l=l, p=p):
            moved = p.reshape(-1).at[i].add(jnp.asarray(mu, p.dtype)).reshape(p.shape)
            return jnp.asarray(value_fn(treedef.unflatten(leaves[:l] + [moved] + leaves[l + 1:])), jnp.float32)
        vals = jax.lax.map(loss_at, idx, batch_size=min(chunk_size, idx.shape[0]))
        g = jnp.zeros(p.size, jnp.float32).at[idx].set((vals - base) / mu)
        grads.append(g.reshape(p.shape).astype(p.dtype))
    return treedef.unflatten(grads)


def deepzero(learning_rate, density: float = 0.05, mu: float = 5e-3, reshuffle_every: int = 100,
             chunk_size: int = 64, momentum: float = 0.0, weight_decay: float = 0.0, seed: int = 0,
             layer_density=None, *, mask=None) -> optax.GradientTransformationExtraArgs:
    """DeepZero sparse CGE as an optax transform taking the loss as ``value_fn``.

    Args:
      learning_rate: a finite positive number or a schedule of the step count.
      density: kept fraction of every leaf's coordinates, in (0, 1] (default 0.05).
      mu: forward-difference step (default 5e-3).
      reshuffle_every: steps between redraws of the kept coordinates (default 100).
      chunk_size: perturbed losses evaluated per vmapped batch (default 64).
      momentum: heavy-ball momentum in [0, 1) (default 0: plain ZO-SGD).
      weight_decay: decoupled decay coefficient; default 0 (no decay).
      seed: seeds the coordinate draws (default 0).
      layer_density: a pytree of floats in (0, 1] laid out like params (e.g. from
        :func:`zo_grasp_densities`); ``None`` keeps ``density`` of every leaf.
      mask: which parameters decay, as in ``optax.adamw``: a bool pytree (a prefix of params)
        or a function params -> bool pytree; ``None`` decays every parameter.
    """
    learning_rate = _checks.learning_rate(learning_rate)
    density = _checks.fraction(density, "density")
    mu = _checks.positive(mu, "mu")
    reshuffle_every = _checks.positive_int(reshuffle_every, "reshuffle_every")
    chunk_size = _checks.positive_int(chunk_size, "chunk_size")
    momentum = _checks.beta(momentum, "momentum")
    weight_decay = _checks.non_negative(weight_decay, "weight_decay")
    seed = _checks.non_negative_int(seed, "seed")
    mask = _checks.decay_mask(mask)

    def init(params):
        kept_counts(params, density, layer_density)   # validates layer_density early
        buf = jax.tree.map(jnp.zeros_like, params) if momentum else ()
        return DeepZeroState(jax.random.PRNGKey(seed), jnp.zeros([], jnp.int32), buf)

    def update(updates, state, params=None, *, value_fn=None, **extra):
        del updates, extra
        value_fn = _checks.need_value_fn(value_fn, "deepzero")
        _checks.need_params(params, "deepzero")
        kept = kept_counts(params, density, layer_density)
        idx = mask_indices(state.key, state.count, params, kept, reshuffle_every)
        g = coordinate_estimate(value_fn, params, idx, mu, chunk_size)
        buf = jax.tree.map(lambda b, x: momentum * b + x, state.buf, g) if momentum else ()
        direction = buf if momentum else g
        lr = _checks.lr_at(learning_rate, state.count)
        leaves, treedef = jax.tree.flatten(params)
        flags = _checks.decay_flags(mask, params) if weight_decay else [False] * len(leaves)
        new = treedef.unflatten([(-lr * (d + weight_decay * p if f else d)).astype(p.dtype) for d, p, f in zip(
            treedef.flatten_up_to(direction), leaves, flags)])
        return new, DeepZeroState(state.key, optax.safe_int32_increment(state.count), buf)

    return optax.GradientTransformationExtraArgs(init, update)


def zo_grasp_scores(value_fn, params, key, num_samples: int = 64, mu: float = 5e-3, delta: float = 1e-2) -> Any:
    """Zeroth-order GraSP scores −θ ⊙ Hg, with g and Hg from forward-difference random estimates.

    ĝ(x) = (1/q) Σ_s (L(x + μ u_s) − L(x)) / μ · u_s with shared Gaussian u_s;
    Hg ≈ (ĝ(θ + δ ĝ(θ)) − ĝ(θ)) / δ. Compiled once per ``value_fn`` and params layout.
    """
    num_samples = _checks.positive_int(num_samples, "num_samples")
    mu, delta = _checks.positive(mu, "mu"), _checks.positive(delta, "delta")
    return _grasp_scores(value_fn, params, key, num_samples, mu, delta)


@jax.jit(static_argnums=0)
def _grasp_scores(value_fn, params, key, num_samples, mu, delta):
    def rge(x):
        base = jnp.asarray(value_fn(x), jnp.float32)

        def body(s, acc):
            u = gaussian_like(jax.random.fold_in(key, s), x)
            d = (jnp.asarray(value_fn(axpy(mu, u, x)), jnp.float32) - base) / mu
            return axpy(d / num_samples, u, acc)
        return jax.lax.fori_loop(0, num_samples, body, jax.tree.map(jnp.zeros_like, x))

    g = rge(params)
    hg = jax.tree.map(lambda a, b: (a - b) / delta, rge(axpy(delta, g, params)), g)
    return jax.tree.map(lambda p, h: -p * h, params, hg)


def zo_grasp_densities(value_fn, params, density: float, *, key, num_samples: int = 64,
                       mu: float = 5e-3, delta: float = 1e-2) -> Any:
    """Per-leaf kept fractions (Python floats, laid out like params) from ZO-GraSP scores.

    The ``density`` fraction of all coordinates with the lowest scores is kept; each leaf's
    density is its kept share (at least one coordinate per leaf). Runs eagerly, once.
    """
    density = _checks.fraction(density, "density")
    scores = zo_grasp_scores(value_fn, params, key, num_samples, mu, delta)
    leaves, treedef = jax.tree.flatten(scores)
    flat = np.concatenate([np.asarray(s, np.float64).reshape(-1) for s in leaves])
    keep = max(1, int(round(density * flat.size)))
    threshold = np.sort(flat)[keep - 1]
    out = []
    for s in leaves:
        s = np.asarray(s, np.float64)
        out.append(max(1, int(np.sum(s <= threshold))) / max(1, s.size))
    return treedef.unflatten(out)
