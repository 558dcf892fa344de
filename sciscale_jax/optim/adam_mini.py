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
_NORMS = ("attn_norm", "mlp_norm", "final_norm", "norm")  # "norm": ESM-2's head LayerNorm


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
        if owner in ("query", "key", "value", "out", "wi", "wg", "wo", "lm_head", "dense") and nd >= 2:
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
              weight_decay: float = 0.0, *, partition: Partition | None = None,
              mask=None) -> optax.GradientTransformation:
    """Adam-mini as an optax transform.

    Args:
      learning_rate: a finite positive number or a schedule of the step count.
      b1, b2, eps: Adam's moment decays and denominator offset (defaults 0.9, 0.999, 1e-8).
      weight_decay: decoupled decay coefficient; default 0 (no decay).
      partition: the block rule, ``(path, array) -> axes``; default :func:`transformer_partition`.
      mask: which parameters decay, as in ``optax.adamw``: a bool pytree (a prefix of params)
        or a function params -> bool pytree; ``None`` decays every parameter. See
        :func:`sciscale_jax.optim.default_decay_mask`.
    """
    learning_rate = _checks.learning_rate(learning_rate)
    b1, b2 = _checks.beta(b1, "b1"), _checks.beta(b2, "b2")
    eps = _checks.non_negative(eps, "eps")
    weight_decay = _checks.non_negative(weight_decay, "weight_decay")
    mask = _checks.decay_mask(mask)
    if partition is None:
        partition = transformer_partition
    elif not callable(partition):
        raise ValueError(f"partition={partition!r} must be a function (path, array) -> axes")

    def block_axes(tree) -> list[tuple[int, ...]]:
        # One axes tuple per array leaf. Leaves are found by flattening, so tuples, lists,
        # NamedTuples, None and optax.MaskedNode in the tree are containers like any other.
        return [_validated_axes(partition, path, p) for path, p in jax.tree_util.tree_flatten_with_path(tree)[0]]

    def init(params):
        leaves, treedef = jax.tree.flatten(params)
        nu = [jnp.zeros([1 if i in a else s for i, s in enumerate(p.shape)], jnp.float32)
              for p, a in zip(leaves, block_axes(params))]
        mu = [jnp.zeros(p.shape, jnp.float32) for p in leaves]
        return AdamMiniState(jnp.zeros([], jnp.int32), treedef.unflatten(mu), treedef.unflatten(nu))

    def update(updates, state, params=None):
        if weight_decay:
            _checks.need_params(params, "adam_mini(weight_decay > 0)")
        grads, treedef = jax.tree.flatten(updates)
        axes = block_axes(updates)
        decay = _checks.decay_flags(mask, params) if weight_decay else [False] * len(grads)
        plist = treedef.flatten_up_to(params) if weight_decay else [None] * len(grads)
        count = optax.safe_int32_increment(state.count)
        lr = _checks.lr_at(learning_rate, state.count)
        t = count.astype(jnp.float32)
        c1, c2 = 1 - b1 ** t, 1 - b2 ** t
        new, mus, nus = [], [], []
        for g, m, v, a, p, d in zip(grads, treedef.flatten_up_to(state.mu), treedef.flatten_up_to(state.nu),
                                    axes, plist, decay):
            g32 = g.astype(jnp.float32)
            m = b1 * m + (1 - b1) * g32
            v = b2 * v + (1 - b2) * jnp.mean(g32 * g32, axis=a, keepdims=True)
            step = (m / c1) / (jnp.sqrt(v / c2) + eps)
            if d:
                step = step + weight_decay * p.astype(jnp.float32)
            new.append((-lr * step).astype(g.dtype))
            mus.append(m)
            nus.append(v)
        return treedef.unflatten(new), AdamMiniState(count, treedef.unflatten(mus), treedef.unflatten(nus))

    return optax.GradientTransformation(init, update)
