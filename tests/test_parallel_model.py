"""A tiny attention + MLP block in plain JAX with logical axes, shared by the parallel tests.

Holds no tests: it is the single-device model every strategy in
``tests/test_parallel_strategies.py`` must reproduce, and the recipe a train step follows to
use ``sciscale_jax.parallel``: mesh -> rules -> shardings of params / opt state / batch -> jit.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax

from sciscale_jax.attention import dot_product_attention
from sciscale_jax.parallel import batch_sharding, reduce_scatter_value_and_grad, train_shardings
from sciscale_jax.parallel.rules import with_logical_constraint

# Odd head_dim; the rest divide the mesh sizes the tests use (8, 4x2, 2x4).
B, S, E, H, D, F = 8, 16, 8, 8, 3, 16

AXES = {
    "norm1": ("embed",), "wq": ("embed", "heads", "kv"), "wk": ("embed", "heads", "kv"),
    "wv": ("embed", "heads", "kv"), "wo": ("heads", "kv", "embed"),
    "norm2": ("embed",), "w1": ("embed", "mlp"), "w2": ("mlp", "embed"),
}
BATCH_AXES = ("batch", "seq", "embed")


def init_params(seed=0):
    rng = np.random.default_rng(seed)
    shapes = {"norm1": (E,), "wq": (E, H, D), "wk": (E, H, D), "wv": (E, H, D), "wo": (H, D, E),
              "norm2": (E,), "w1": (E, F), "w2": (F, E)}
    return {k: jnp.asarray(1.0 + 0.1 * rng.normal(size=s) if k.startswith("norm")
                           else rng.normal(size=s) / np.sqrt(s[0]), jnp.float32) for k, s in shapes.items()}


def make_batch(seed=1):
    rng = np.random.default_rng(seed)
    return (jnp.asarray(rng.normal(size=(B, S, E)), jnp.float32),
            jnp.asarray(rng.normal(size=(B, S, E)), jnp.float32))


def loss_fn(params, batch, *, rules=None, attention="xla", causal=False):
    x, y = batch
    c = lambda t, axes: with_logical_constraint(t, axes, rules)
    rms = lambda t, w: t * jax.lax.rsqrt(jnp.mean(t * t, -1, keepdims=True) + 1e-6) * w
    x = c(x, BATCH_AXES)
    h = c(rms(x, params["norm1"]), BATCH_AXES)
    q, k, v = (c(jnp.einsum("bse,ehd->bshd", h, params[w]), ("batch", "seq", "heads", "kv"))
               for w in ("wq", "wk", "wv"))
    a = dot_product_attention(q, k, v, causal=causal, impl=attention)
    a = c(a, ("batch", "seq", "heads", "kv"))
    x = c(x + jnp.einsum("bshd,hde->bse", a, params["wo"]), BATCH_AXES)
    h = c(rms(x, params["norm2"]), BATCH_AXES)
    m = c(jax.nn.gelu(jnp.einsum("bse,ef->bsf", h, params["w1"])), ("batch", "seq", "mlp"))
    x = c(x + jnp.einsum("bsf,fe->bse", m, params["w2"]), BATCH_AXES)
    return jnp.mean((x - y) ** 2)


OPTIMIZER = optax.adam(1e-2, eps=1e-3)


def run(steps, *, mesh=None, rules=None, zero=0, attention="xla", causal=False):
    """Train ``steps`` steps; returns (losses, first-step grads, final params), all on host."""
    params, batch = init_params(), make_batch()
    opt_state = OPTIMIZER.init(params)

    def step(params, opt_state, batch, grad_fn):
        loss, grads = grad_fn(params, batch)
        updates, opt_state = OPTIMIZER.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss, grads

    if mesh is None:
        grad_fn = jax.value_and_grad(lambda p, b: loss_fn(p, b, attention=attention, causal=causal))
        jitted = jax.jit(lambda p, o, b: step(p, o, b, grad_fn))
    else:
        sh = train_shardings(params, AXES, rules, mesh, zero, OPTIMIZER)
        batch_sh = tuple(batch_sharding(x.shape, BATCH_AXES, rules, mesh) for x in batch)
        if zero == 2 and attention == "xla":  # the hand-written reduce-scatter path
            grad_fn = reduce_scatter_value_and_grad(loss_fn, mesh, sh.grads)
        else:
            def grad_fn(p, b):
                loss, g = jax.value_and_grad(lambda p, b: loss_fn(p, b, rules=rules, attention=attention,
                                                                  causal=causal))(p, b)
                return loss, jax.lax.with_sharding_constraint(g, sh.grads)
        jitted = jax.jit(lambda p, o, b: step(p, o, b, grad_fn),
                         in_shardings=(sh.params, sh.opt_state, batch_sh),
                         out_shardings=(sh.params, sh.opt_state, None, sh.grads))
        params, opt_state, batch = (jax.device_put(t, s) for t, s in
                                    ((params, sh.params), (opt_state, sh.opt_state), (batch, batch_sh)))
    losses, first_grads = [], None
    with jax.set_mesh(mesh) if mesh is not None else _null():
        for _ in range(steps):
            params, opt_state, loss, grads = jitted(params, opt_state, batch)
            losses.append(float(loss))
            first_grads = jax.device_get(grads) if first_grads is None else first_grads
    return np.array(losses), first_grads, jax.device_get(params), params


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False
