"""Attention, the Pallas kernel and the optimizers work with ``jax_enable_x64`` on and off.

Many scientific JAX codes turn x64 on globally; then a bare Python int in index arithmetic
becomes int64 and meets the kernels' int32 program ids. Each case here runs under both
settings: the exact attention implementations (xla, chunked, flash; causal or not; odd
sizes; grouped kv heads) against a float64 reference written plainly in the test, values
and gradients; every optimizer's updates against the same optimizer run with x64 off.
"""

import contextlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from sciscale_jax.attention import dot_product_attention
from sciscale_jax.optim import OPTIMIZERS, get_optimizer, is_zeroth_order

B, H, HKV, D = 1, 2, 1, 16


def _x64(on: bool):
    return jax.enable_x64(True) if on else contextlib.nullcontext()


def _reference(q, k, v, bias, causal):
    """softmax(q kᵀ / sqrt(D) + bias) v with the causal mask aligned at the end, in float64 jnp."""
    q, k, v = (jnp.asarray(a, jnp.float64) for a in (q, k, v))
    k, v = jnp.repeat(k, H // HKV, axis=2), jnp.repeat(v, H // HKV, axis=2)
    s = jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(D)
    if bias is not None:
        s = s + jnp.asarray(bias, jnp.float64)
    if causal:
        sq, sk = q.shape[1], k.shape[1]
        s = jnp.where(np.arange(sk)[None, :] <= np.arange(sq)[:, None] + (sk - sq), s, -jnp.inf)
    return jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(s, axis=-1), v)


def _inputs(sq, sk, with_bias):
    rng = np.random.default_rng(sq * 100 + sk)
    q = rng.normal(size=(B, sq, H, D)).astype(np.float32)
    k = rng.normal(size=(B, sk, HKV, D)).astype(np.float32)
    v = rng.normal(size=(B, sk, HKV, D)).astype(np.float32)
    bias = rng.normal(size=(B, H, sq, sk)).astype(np.float32) if with_bias else None
    w = rng.normal(size=(B, sq, H, D))   # the loss weights: a random projection of the output
    return q, k, v, bias, w


_CASES = [  # (impl, causal, q_len, kv_len, bias)
    ("xla", False, 13, 29, True), ("xla", True, 37, 37, False),
    ("chunked", False, 13, 29, True), ("chunked", True, 37, 37, False),
    ("flash", False, 13, 29, True), ("flash", True, 37, 37, False), ("flash", True, 19, 31, False),
]


@pytest.mark.parametrize("x64", [False, True], ids=["x64_off", "x64_on"])
@pytest.mark.parametrize("impl, causal, sq, sk, with_bias", _CASES)
def test_attention_matches_float64_reference(x64, impl, causal, sq, sk, with_bias):
    q, k, v, bias, w = _inputs(sq, sk, with_bias)
    with jax.enable_x64(True):
        args = (q, k, v) + ((bias,) if with_bias else ())
        ref_loss = lambda q, k, v, *b: jnp.sum(w * _reference(q, k, v, b[0] if b else None, causal))  # noqa: E731
        ref_out = _reference(q, k, v, bias, causal)
        ref_grads = jax.jit(jax.grad(ref_loss, argnums=tuple(range(len(args)))))(
            *(a.astype(np.float64) for a in args))
    with _x64(x64):
        def loss(q, k, v, *b):
            out = dot_product_attention(q, k, v, bias=b[0] if b else None, causal=causal, impl=impl)
            return jnp.sum(jnp.asarray(w, out.dtype) * out), out
        (_, out), grads = jax.jit(jax.value_and_grad(loss, argnums=tuple(range(len(args))), has_aux=True))(
            *(jnp.asarray(a) for a in args))
    assert out.dtype == jnp.float32 and all(g.dtype == jnp.float32 for g in grads)
    # float32 softmax attention over <= 37 keys: errors of a few ulp times the reductions' length
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref_out), rtol=1e-4, atol=1e-5)
    for g, r in zip(grads, ref_grads):
        np.testing.assert_allclose(np.asarray(g), np.asarray(r), rtol=1e-4, atol=1e-4 * float(np.abs(r).max()))


@pytest.mark.parametrize("impl", ["xla", "chunked"])
def test_float64_attention_under_x64(impl):
    """With x64 on, float64 inputs give float64 outputs that agree with the reference.

    The softmax runs in float32 by design (logits are accumulated in float32), so the
    agreement is float32's, not float64's."""
    q, k, v, _, _ = _inputs(11, 23, False)
    with jax.enable_x64(True):
        q, k, v = (jnp.asarray(a, jnp.float64) for a in (q, k, v))
        out = jax.jit(lambda q, k, v: dot_product_attention(q, k, v, causal=True, impl=impl))(q, k, v)
        assert out.dtype == jnp.float64
        np.testing.assert_allclose(np.asarray(out), np.asarray(_reference(q, k, v, None, True)), rtol=1e-4, atol=1e-5)


def _opt_updates(name, params, x64):
    """Two steps of ``name`` (weight decay on where it has one) on a quadratic; the updates."""
    kwargs = {"weight_decay": 0.1} if name not in ("sm3",) else {}
    opt = get_optimizer(name, 0.05, **kwargs)
    loss = lambda p: sum(jnp.sum((x - 0.5) ** 2) for x in jax.tree.leaves(p))  # noqa: E731
    with _x64(x64):
        params = jax.tree.map(jnp.asarray, params)

        @jax.jit
        def run(params):
            state, out = opt.init(params), []
            for _ in range(2):
                if is_zeroth_order(name):
                    u, state = opt.update(None, state, params, value_fn=loss)
                else:
                    u, state = opt.update(jax.grad(loss)(params), state, params)
                out.append(u)
                params = optax.apply_updates(params, u)
            return out
        return run(params)


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_optimizer_same_with_x64_on_and_off(name):
    rng = np.random.default_rng(1)
    params = {"w": rng.normal(size=(5, 3)).astype(np.float32), "b": rng.normal(size=(3,)).astype(np.float32),
              "s": np.float32(rng.normal())}
    off = _opt_updates(name, params, False)
    on = _opt_updates(name, params, True)
    for u_off, u_on in zip(off, on):
        for a, b in zip(jax.tree.leaves(u_off), jax.tree.leaves(u_on)):
            assert b.dtype == jnp.float32
            np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-5, atol=1e-7)
    # float64 parameters under x64: updates stay float64 and finite
    p64 = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
    for u in _opt_updates(name, p64, True):
        assert all(x.dtype == jnp.float64 and np.all(np.isfinite(x)) for x in jax.tree.leaves(u))
