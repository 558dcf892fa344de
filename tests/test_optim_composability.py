"""Every optimizer in sciscale_jax.optim composes with optax: masked, multi_transform, chain, MultiSteps.

One parametrised suite runs every registered optimizer (first and zeroth order) on a tree
holding dicts, tuples, lists, a NamedTuple and a ``None`` leaf. Each check has its own
reference: the optimizer run on the flat list of the leaves it should see (none of the
tree's containers), the masked-out leaves passed through untouched, plain arithmetic
(``-0.1·g`` for an ``optax.scale`` group, the mean of two gradients for ``MultiSteps``).
Zeroth-order optimizers ignore the incoming updates and take the loss as ``value_fn``; the
loss here is a sum over leaves, so it means the same on the tree, the flat list and the
``optax.MaskedNode``-holding tree ``optax.masked`` hands to its inner transform.
"""

import inspect
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from sciscale_jax.optim import OPTIMIZERS, get_optimizer, is_zeroth_order
from sciscale_jax.optim import registry


class Pair(NamedTuple):
    kernel: Any
    bias: Any


# Leaf order of jax.tree.leaves: dense/b, dense/w, lst/0, lst/1, none (no leaf), nt/kernel, nt/bias, tup/0, tup/1
MASK = {"dense": {"w": True, "b": False}, "tup": (True, False), "lst": [False, True],
        "nt": Pair(True, False), "none": None}
KEEP = [i for i, m in enumerate(jax.tree.leaves(MASK)) if m]   # leaves the masked transform sees

# Small-size settings so that every code path runs on tiny leaves (8-bit blocks, Adam-mini blocks).
# Zeroth-order steps divide a loss difference (float32 rounding ~1e-6 of a loss ~20) by the
# perturbation; a perturbation of 0.05 keeps that rounding ~1e-5 of the update.
_SETTINGS = {"adamw_8bit": dict(min_8bit_size=8, block_size=4),
             "adam_mini": dict(partition=lambda path, a: (0,) if a.ndim >= 2 else ()),
             "mezo": dict(eps=0.05), "zo_adamu": dict(eps=0.05),
             "deepzero": dict(density=0.4, chunk_size=3, mu=0.05)}
STEPS = 3


def make(name):
    kwargs = dict(_SETTINGS.get(name, {}))
    if "weight_decay" in inspect.signature(registry.factory(name)).parameters:
        kwargs["weight_decay"] = 0.1      # so params travel through every combinator too
    return get_optimizer(name, 0.05, **kwargs)


def tree(rng):
    a = lambda *s: jnp.asarray(rng.normal(size=s), jnp.float32)  # noqa: E731
    return {"dense": {"w": a(5, 3), "b": a(3)}, "tup": (a(4, 3), a(2)), "lst": [a(3, 3, 2), a()],
            "nt": Pair(a(2, 5), a(5)), "none": None}


def loss(p):
    return sum(jnp.sum(0.5 * x * x + 0.3 * jnp.sin(3.0 * x)) for x in jax.tree.leaves(p))


def run(opt, params, grads, zo, apply_scale=1.0):
    """The updates of ``len(grads)`` steps (a list), applying ``apply_scale`` × each before the next."""
    @jax.jit
    def go(params, grads_stacked):
        def step(carry, g):
            params, state = carry
            extra = {"value_fn": loss} if zo else {}
            u, state = opt.update(g, state, params, **extra)
            return (jax.tree.map(lambda p, x: p + apply_scale * x, params, u), state), u
        return jax.lax.scan(step, (params, opt.init(params)), grads_stacked)[1]
    out = go(params, jax.tree.map(lambda *x: jnp.stack(x), *grads))
    return [jax.tree.map(lambda x: x[i], out) for i in range(len(grads))]


def leaves(t):
    return [np.asarray(x) for x in jax.tree.leaves(t)]


def close(got, want, zo):
    # Same float32 arithmetic in two programs: XLA may fuse and sum differently, so allow
    # rounding; zeroth-order projections divide a loss difference by 2·eps, which amplifies it.
    rtol, atol = (1e-4, 1e-5) if zo else (1e-5, 1e-6)
    assert len(got) == len(want)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=rtol, atol=atol)


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    return tree(rng), [tree(rng) for _ in range(STEPS)]


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_nested_tree_equals_flat_list(name, data):
    """Tuples, lists, NamedTuples and None are containers: the update is that of the flat leaf list."""
    params, grads = data
    zo = is_zeroth_order(name)
    got = run(make(name), params, grads, zo)
    want = run(make(name), jax.tree.leaves(params), [jax.tree.leaves(g) for g in grads], zo)
    for u, w in zip(got, want):
        assert jax.tree.structure(u) == jax.tree.structure(params)
        close(leaves(u), leaves(w), zo)


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_inside_masked(name, data):
    params, grads = data
    zo = is_zeroth_order(name)
    got = run(optax.masked(make(name), MASK), params, grads, zo)
    sub = lambda t: [jax.tree.leaves(t)[i] for i in KEEP]  # noqa: E731
    want = run(make(name), sub(params), [sub(g) for g in grads], zo)
    for u, g, w in zip(got, grads, want):
        assert jax.tree.structure(u) == jax.tree.structure(params)
        u = leaves(u)
        for i, gi in enumerate(leaves(g)):
            if i not in KEEP:
                np.testing.assert_array_equal(u[i], gi)   # masked out: passed through untouched
        close([u[i] for i in KEEP], leaves(w), zo)


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_inside_multi_transform(name, data):
    params, grads = data
    zo = is_zeroth_order(name)
    labels = jax.tree.map(lambda m: "opt" if m else "sgd", MASK)
    got = run(optax.multi_transform({"opt": make(name), "sgd": optax.scale(-0.1)}, labels), params, grads, zo)
    sub = lambda t: [jax.tree.leaves(t)[i] for i in KEEP]  # noqa: E731
    want = run(make(name), sub(params), [sub(g) for g in grads], zo)
    for u, g, w in zip(got, grads, want):
        u = leaves(u)
        for i, gi in enumerate(leaves(g)):
            if i not in KEEP:
                np.testing.assert_allclose(u[i], -0.1 * gi, rtol=1e-6)
        close([u[i] for i in KEEP], leaves(w), zo)


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_inside_chain(name, data):
    """chain(scale(0.5), opt, scale(-2)) gives -2 × opt's update of the halved gradients."""
    params, grads = data
    zo = is_zeroth_order(name)
    got = run(optax.chain(optax.scale(0.5), make(name), optax.scale(-2.0)), params, grads, zo)
    want = run(make(name), params, [jax.tree.map(lambda x: 0.5 * x, g) for g in grads], zo, apply_scale=-2.0)
    for u, w in zip(got, want):
        close(leaves(u), [-2.0 * x for x in leaves(w)], zo)


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_inside_multisteps(name, data):
    """k=1 is the plain optimizer; for first-order ones k=2 emits zeros, then the step on the mean gradient."""
    params, grads = data
    zo = is_zeroth_order(name)
    got = run(optax.MultiSteps(make(name), every_k_schedule=1), params, grads, zo)
    want = run(make(name), params, grads, zo)
    for u, w in zip(got, want):
        close(leaves(u), leaves(w), zo)
    if zo:
        return   # a zeroth-order step sees no gradient, so there is nothing to accumulate
    got = run(optax.MultiSteps(make(name), every_k_schedule=2), params, grads[:2], zo)
    mean = jax.tree.map(lambda a, b: (a + b) / 2, grads[0], grads[1])
    want = run(make(name), params, [mean], zo)
    assert all(not np.any(x) for x in leaves(got[0]))
    close(leaves(got[1]), leaves(want[0]), zo)
