"""Chunked Evoformer (AlphaFold's subbatch_size / OpenFold's chunk_size) equals the unchunked one,
forward and gradients, for chunk sizes that do and do not divide the axes (N_seq 5, N_res 11);
the attention front door's chunked implementation returns the shared pair bias's gradient
reduced to the bias's broadcast shape, as plain XLA autodiff does."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sciscale_jax import attention
from sciscale_jax.models.evoformer import EvoformerBlock
from test_evoformer import make_inputs, perturb, small_config


def _value_and_grads(block, m, z, msa_mask, pair_mask, w_m, w_z):
    @nnx.jit
    def run(block, m, z):
        def loss(block, m, z):
            m_out, z_out = block(m, z, msa_mask, pair_mask)
            return jnp.sum(m_out * w_m) + jnp.sum(z_out * w_z), (m_out, z_out)
        return nnx.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(block, m, z)
    (_, outs), grads = run(block, m, z)
    return outs, grads


def _close(a, b, what):
    """rtol 1e-5 with an absolute floor scaled to the largest entry of the whole tree: some
    gradients are exactly zero in exact arithmetic (a LayerNorm offset feeding only a softmax
    bias) and are float32 rounding noise on both sides."""
    pairs = [(np.asarray(x, np.float64), np.asarray(y, np.float64))
             for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)]
    scale = max(np.abs(y).max() for _, y in pairs)
    for x, y in pairs:
        np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-5 * scale, err_msg=what)


_CACHE = {}


def _reference(extra):
    """The unchunked block (parameters perturbed), its inputs and its outputs and gradients."""
    if extra not in _CACHE:
        block = perturb(EvoformerBlock(small_config(), extra=extra, rngs=nnx.Rngs(0)), 1)
        m, z, msa_mask, pair_mask, _ = make_inputs(7)
        if extra:
            m = m[..., :8]
        rng = np.random.default_rng(1)
        w_m, w_z = rng.normal(size=m.shape).astype(np.float32), rng.normal(size=z.shape).astype(np.float32)
        args = (m, z, msa_mask, pair_mask, w_m, w_z)
        _CACHE[extra] = (block, args, _value_and_grads(block, *args))
    return _CACHE[extra]


@pytest.mark.parametrize("extra,overrides", [
    (False, dict(chunk_size=5)),                       # divides N_seq 5, not N_res 11
    (True, dict(chunk_size=4)),                        # extra-MSA block (global column attention): divides neither
    pytest.param(False, dict(chunk_size=4, chunk_remat=False), marks=pytest.mark.slow),  # no per-chunk remat
    pytest.param(False, dict(chunk_size=1), marks=pytest.mark.slow),                     # divides both
    pytest.param(False, dict(attention="chunked"), marks=pytest.mark.slow),  # front door's chunked attention
])
def test_chunked_block_equals_unchunked(extra, overrides):
    block, args, (outs, grads) = _reference(extra)
    other = EvoformerBlock(small_config(**overrides), extra=extra, rngs=nnx.Rngs(5))
    nnx.update(other, nnx.state(block, nnx.Param))
    outs_c, grads_c = _value_and_grads(other, *args)
    _close(outs_c, outs, "forward")
    _close(nnx.state(grads_c[0], nnx.Param), nnx.state(grads[0], nnx.Param), "parameter gradients")
    _close(grads_c[1:], grads[1:], "input gradients")


@pytest.mark.parametrize("bias_shape", [(1, 2, 7, 9), (1, 2, 1, 9), (3, 1, 7, 9)])
def test_chunked_attention_bias_gradient_keeps_broadcast_shape(bias_shape):
    """Bias shared across the batch (MSA rows folded into it): gradient summed over the broadcast axes."""
    k1, k2, k3, k4, k5 = jax.random.split(jax.random.key(0), 5)
    q = jax.random.normal(k1, (3, 7, 2, 4))
    k = jax.random.normal(k2, (3, 9, 2, 4))
    v = jax.random.normal(k3, (3, 9, 2, 4))
    bias = jax.random.normal(k4, bias_shape)
    mask = jax.random.bernoulli(k5, 0.8, (3, 1, 1, 9))

    def loss(impl, q, k, v, bias):
        out = attention.chunked_attention(q, k, v, bias=bias, mask=mask, q_chunk=3, kv_chunk=4) if impl else \
            attention.xla_attention(q, k, v, bias=bias, mask=mask)
        return jnp.sum(out * jnp.cos(out))

    g_chunked = jax.jit(jax.grad(lambda *a: loss(True, *a), argnums=(0, 1, 2, 3)))(q, k, v, bias)
    with jax.enable_x64(True):
        g_ref = jax.grad(lambda *a: loss(False, *a), argnums=(0, 1, 2, 3))(
            *(jnp.asarray(np.asarray(x), jnp.float64) for x in (q, k, v, bias)))
    assert g_chunked[3].shape == bias_shape
    for a, b in zip(g_chunked, g_ref):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5 * np.abs(b).max())
