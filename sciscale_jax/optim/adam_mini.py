"""Adam-mini (Zhang et al. 2024, "Adam-mini: Use Fewer Learning Rates To Gain More"), v1.1 partition.

Adam keeps one second moment per parameter; Adam-mini keeps one per *block*, the mean of g²
over the block, and so cuts optimizer state nearly in half. The first moment stays
per-element; the update is bias-corrected Adam with decoupled weight decay:

    m ← b1·m + (1−b1)·g,   v_B ← b2·v_B + (1−b2)·mean_{i∈B} g_i²
    θ ← θ − lr·( m̂ / (sqrt(v̂_B) + eps) + wd·θ ),  m̂ = m/(1−b1^t), v̂ = v/(1−b2^t)

Moments are computed and kept in float32 whatever the parameter dtype.

Partition contract. ``partition(path, array) -> tuple[int, ...]`` names the axes of
``array`` that g² is averaged over; the second moment keeps the other axes (with size 1 on
the reduced ones). ``()`` means one value per element (plain Adam), all axes one value per
tensor. ``path`` is the leaf's pytree path as plain ``str`` / ``int`` entries (dict keys,
attribute names, list indices). Returned axes must be distinct ints in [-ndim, ndim);
anything else raises ``ValueError`` at ``init``.

The default, :func:`transformer_partition`, understands sciscale_jax's Transformer (Flax
[in, out] kernels) with the v1.1 rules: query/key kernels [embed, heads, head_dim] one
value per head; value, attention-output, MLP (wi, wg, wo), embedding and lm_head one value
per output neuron (the mean over the input axes; for the embedding [vocab, embed] one per
token); norm scales one per tensor; biases and anything unrecognised per element. Under
``scan_layers`` the block parameters carry a leading stacked ``layers`` axis (the path holds
``layers`` not followed by a list index); that axis is never reduced, so blocks stay per
layer.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import optax

from sciscale_jax.optim import _checks

Partition = Callable[[tuple, jax.Array], Sequence[int]]
_NORMS = ("attn_norm", "mlp_norm", "final_norm")


def _stacked(names: tuple) -> bool:
    """True when the path runs through a ``layers`` collection stacked on a leading axis."""
    for i, n in enumerate(names):
        if n == "layers":
            return not (i + 1 < len(names) and isinstance(names[i + 1], int))
    return False


def transformer_partition(path: tuple, array) -> tuple[int, ...]:
    """The Adam-mini v1.1 blocks for the sciscale_jax Transformer's parameters (see module doc)."""
    names = tuple(path)
    if len(names) > 1 and names[-1] == "value":   # nnx.Variable's own attribute, not a module name
        names = names[:-1]
    leaf = names[-1] if names else None
    owner = names[-2] if len(names) > 1 else None
    lead = 1 if _stacked(names) and array.ndim >= 1 else 0
    nd = array.ndim - lead                         # dims of one layer's tensor
    axes = lambda *a: tuple(lead + i for i in a)  # noqa: E731
    if nd == 0 or leaf == "bias":
        return ()
    if leaf == "scale" or set(names) & set(_NORMS):
        return axes(*range(nd))                    # one per tensor (per layer)
    if "embed" in (leaf, owner) and nd == 2:       # [vocab, embed]: one per token
        return axes(1)
    if leaf == "kernel":
        if owner in ("query", "key") and nd == 3:  # [embed, heads, head_dim]: one per head
            return axes(0, 2)
        if owner == "out" and nd == 3:             # [heads, head_dim, embed]: one per output
            return axes(0, 1)
        if owner in ("query", "key", "value", "out", "wi", "wg", "wo", "lm_head") and nd >= 2:
            return axes(0)                         # [in, out]: one per output neuron
    return ()


class AdamMiniState(NamedTuple):
    count: jax.Array
    mu: Any   # like params
    nu: Any   # per leaf: g² means with the reduced axes kept at size 1


def _validated_axes(partition: Partition, path, p) -> tuple[int, ...]:
    names = _checks.path_names(path)
    got = partition(names, p)
    bad = not isinstance(got, (tuple, list)) or any(
        not isinstance(a, int) or isinstance(a, bool) or not -p.ndim <= a < p.ndim for a in got)
    if not bad:
        norm = tuple(sorted(a % p.ndim for a in got))
        bad = len(set(norm)) != len(norm)
    if bad:
        raise ValueError(f"adam_mini partition returned {got!r} for parameter {'/'.join(map(str, names))} "
                         f"of shape {p.shape}: expected distinct int axes in [-{p.ndim}, {p.ndim})")
    return norm


def adam_mini(learning_rate, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8,
              weight_decay: float = 0.0, *, partition: Partition | None = None) -> optax.GradientTransformation:
    """Adam-mini as an optax transform; ``partition`` defaults to :func:`transformer_partition`."""
    learning_rate = _checks.learning_rate(learning_rate)
    b1, b2 = _checks.beta(b1, "b1"), _checks.beta(b2, "b2")
    eps = _checks.non_negative(eps, "eps")
    weight_decay = _checks.non_negative(weight_decay, "weight_decay")
    if partition is None:
        partition = transformer_partition
    elif not callable(partition):
        raise ValueError(f"partition={partition!r} must be a function (path, array) -> axes")

    def block_axes(params):
        return jax.tree_util.tree_map_with_path(lambda path, p: _validated_axes(partition, path, p), params)

    def init(params):
        axes = block_axes(params)
        nu = jax.tree.map(lambda p, a: jnp.zeros([1 if i in a else s for i, s in enumerate(p.shape)], jnp.float32),
                          params, axes, is_leaf=lambda x: isinstance(x, tuple))
        mu = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
        return AdamMiniState(jnp.zeros([], jnp.int32), mu, nu)

    def update(updates, state, params=None):
        if weight_decay:
            _checks.need_params(params, "adam_mini(weight_decay > 0)")
        axes = block_axes(updates)
        count = optax.safe_int32_increment(state.count)
        lr = _checks.lr_at(learning_rate, state.count)
        t = count.astype(jnp.float32)
        c1, c2 = 1 - b1 ** t, 1 - b2 ** t
        g32 = jax.tree.map(lambda g: g.astype(jnp.float32), updates)
        mu = jax.tree.map(lambda g, m: b1 * m + (1 - b1) * g, g32, state.mu)
        nu = jax.tree.map(lambda g, v, a: b2 * v + (1 - b2) * jnp.mean(g * g, axis=a, keepdims=True),
                          g32, state.nu, axes, is_leaf=lambda x: isinstance(x, tuple))
        step = jax.tree.map(lambda m, v: (m / c1) / (jnp.sqrt(v / c2) + eps), mu, nu)
        if weight_decay:
            step = jax.tree.map(lambda s, p: s + weight_decay * p.astype(jnp.float32), step, params)
        new = jax.tree.map(lambda s, g: (-lr * s).astype(g.dtype), step, updates)
        return new, AdamMiniState(count, mu, nu)

    return optax.GradientTransformation(init, update)
