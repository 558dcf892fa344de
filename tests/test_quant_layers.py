"""BitNet / b1.58 / LLM-QAT layers against their equations in NumPy float64; data-free
distillation helpers; the scheme registry and packed byte counts."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from sciscale_jax.precision.fp8 import Fp8Matmul
from sciscale_jax.quant.bitnet import (BitLinear, BitMatmul, absmax_quant_tokens, binarize_weight,
                                       ternarize_weight)
from sciscale_jax.quant.llm_qat import (QATMatmul, distillation_loss, quantize_kv,
                                        sample_from_teacher)
from sciscale_jax.quant.registry import (QUANT_SCHEMES, kv_quantizer, make_linear, make_matmul,
                                         packed_weight_bytes)



def _np_absmax_tokens(x, bits=8):
    s = (2 ** (bits - 1) - 1) / np.abs(x).max(axis=-1, keepdims=True)
    return np.clip(np.round(x * s), -(2 ** (bits - 1)), 2 ** (bits - 1) - 1) / s, s


def _np_sym(x, bits, axis):  # symmetric MinMax, statistics reduced over `axis`
    qmax = 2 ** (bits - 1) - 1
    s = np.abs(x).max(axis=axis, keepdims=True) / qmax
    return np.clip(np.round(x / s), -qmax, qmax) * s, s


def _grad_identity(f, x):
    g = np.random.default_rng(99).normal(size=x.shape).astype(np.float32)
    _, vjp = jax.vjp(f, jnp.asarray(x, jnp.float32))
    np.testing.assert_array_equal(vjp(jnp.asarray(g))[0], g)


def test_binary_and_ternary_weights_on_their_grids_with_identity_ste():
    rng = np.random.default_rng(1)
    w = rng.normal(size=(9, 7)) * 0.3 + 0.05
    w32 = w.astype(np.float32).astype(np.float64)
    wb = np.asarray(binarize_weight(jnp.asarray(w, jnp.float32)), np.float64)
    beta = np.abs(w32).mean()
    np.testing.assert_allclose(wb, np.where(w32 - w32.mean() > 0, 1.0, -1.0) * beta, rtol=1e-6)
    wt = np.asarray(ternarize_weight(jnp.asarray(w, jnp.float32)), np.float64)
    gamma = np.abs(w32).mean()
    levels = wt / gamma
    np.testing.assert_allclose(levels, np.clip(np.round(w32 / (gamma + 1e-5)), -1, 1), atol=1e-6)
    assert set(np.round(levels).astype(int).ravel()) == {-1, 0, 1}
    assert (np.abs(w32) > 1.5 * gamma).any()  # some weights are clipped, yet:
    _grad_identity(binarize_weight, w)
    _grad_identity(ternarize_weight, w)


def test_absmax_activation_8bit_per_token():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(6, 11)) * rng.uniform(0.1, 5, size=(6, 1))
    y = np.asarray(absmax_quant_tokens(jnp.asarray(x, jnp.float32)), np.float64)
    ref, s = _np_absmax_tokens(x.astype(np.float32).astype(np.float64))
    k = y * s
    np.testing.assert_allclose(k, np.round(k), atol=1e-3)
    assert k.min() >= -128 - 1e-3 and k.max() <= 127 + 1e-3
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-6)
    _grad_identity(absmax_quant_tokens, x)


@pytest.mark.parametrize("weight", ["binary", "ternary"])
def test_bitlinear_forward_and_grad_match_equations(weight):
    rng = np.random.default_rng(3)
    layer = BitLinear(10, 3, rngs=nnx.Rngs(0), weight=weight)
    x = rng.normal(size=(2, 5, 10)) + 0.7
    w = np.asarray(layer.kernel[...], np.float64)
    xr = x.reshape(-1, 10).astype(np.float32).astype(np.float64)
    if weight == "binary":
        xr = xr - xr.mean(-1, keepdims=True)
        wq = np.where(w - w.mean() > 0, 1.0, -1.0) * np.abs(w).mean()
    else:
        g = np.abs(w).mean()
        wq = np.clip(np.round(w / (g + 1e-5)), -1, 1) * g
    xn = xr / np.sqrt((xr**2).mean(-1, keepdims=True) + 1e-6)
    xq, _ = _np_absmax_tokens(xn)
    y = layer(jnp.asarray(x, jnp.float32))
    np.testing.assert_allclose(np.asarray(y).reshape(-1, 3), xq @ wq, rtol=1e-4, atol=1e-4)
    c = rng.normal(size=(2, 5, 3))
    gk = nnx.grad(lambda m: jnp.sum(m(jnp.asarray(x, jnp.float32)) * c))(layer)["kernel"][...]
    np.testing.assert_allclose(gk, xq.T @ c.reshape(-1, 3), rtol=1e-4, atol=1e-4)  # STE: dL/dW = xq^T g


def test_llm_qat_matmul_w_per_channel_a_per_token():
    rng = np.random.default_rng(4)
    x = rng.normal(size=(7, 12)) * rng.uniform(0.2, 3, size=(7, 1))
    w = rng.normal(size=(12, 5)) * rng.uniform(0.1, 1, size=(1, 5))
    mm = QATMatmul(w_bits=4, a_bits=8)
    x32, w32 = (t.astype(np.float32).astype(np.float64) for t in (x, w))
    xq, _ = _np_sym(x32, 8, axis=1)
    wq, ws = _np_sym(w32, 4, axis=0)
    y, vjp = jax.vjp(mm, jnp.asarray(x, jnp.float32), jnp.asarray(w, jnp.float32))
    np.testing.assert_allclose(y, xq @ wq, rtol=1e-5, atol=1e-5)
    k = wq / ws
    assert np.abs(k).max() <= 7 + 1e-6 and np.allclose(k, np.round(k), atol=1e-6)
    g = rng.normal(size=(7, 5))
    dx, dw = vjp(jnp.asarray(g, jnp.float32))
    np.testing.assert_allclose(dx, g @ wq.T, rtol=1e-5, atol=1e-5)  # all inside: pure STE
    np.testing.assert_allclose(dw, xq.T @ g, rtol=1e-5, atol=1e-5)


def test_kv_quantisation_per_token_and_head():
    rng = np.random.default_rng(5)
    k = rng.normal(size=(2, 5, 3, 8))
    v = rng.normal(size=(2, 5, 3, 8)) * 2
    kq, vq = quantize_kv(jnp.asarray(k, jnp.float32), jnp.asarray(v, jnp.float32), bits=4)
    for t, tq in ((k, kq), (v, vq)):
        ref, s = _np_sym(t.astype(np.float32).astype(np.float64), 4, axis=-1)
        np.testing.assert_allclose(tq, ref, rtol=1e-5, atol=1e-6)
    assert kv_quantizer("none") is None
    kq2, _ = kv_quantizer("llm_qat_w4a8kv4")(jnp.asarray(k, jnp.float32), jnp.asarray(v, jnp.float32))
    np.testing.assert_array_equal(kq2, kq)


def test_sampling_follows_a_peaked_bigram_teacher():
    rng = np.random.default_rng(6)
    vocab, perm = 11, rng.permutation(11)
    table = jnp.asarray(60.0 * np.eye(vocab)[perm], jnp.float32)  # next token = perm[prev]
    apply = lambda tokens: table[tokens]
    toks = np.asarray(sample_from_teacher(apply, jax.random.key(0), num_sequences=16, length=9,
                                          vocab_size=vocab, greedy_prefix=2))
    np.testing.assert_array_equal(toks[:, 1:], perm[toks[:, :-1]])
    assert len(set(toks[:, 0])) > 3  # first tokens drawn over the vocabulary
    # A flat teacher gives varied continuations (sampling, not argmax).
    flat = sample_from_teacher(lambda t: jnp.zeros(t.shape + (vocab,)), jax.random.key(1),
                               num_sequences=8, length=6, vocab_size=vocab, greedy_prefix=0)
    assert len(np.unique(np.asarray(flat)[:, 1:])) > 3


def test_distillation_loss_and_training_on_teacher_samples():
    rng = np.random.default_rng(7)
    vocab = 7
    t_logits = rng.normal(size=(3, 4, vocab)) * 2
    s_logits = rng.normal(size=(3, 4, vocab))
    mask = rng.random(size=(3, 4)) > 0.3
    tp = np.exp(t_logits) / np.exp(t_logits).sum(-1, keepdims=True)
    sp = np.exp(s_logits) / np.exp(s_logits).sum(-1, keepdims=True)
    kl = (tp * (np.log(tp) - np.log(sp))).sum(-1)
    got = distillation_loss(jnp.asarray(s_logits), jnp.asarray(t_logits), jnp.asarray(mask))
    np.testing.assert_allclose(got, (kl * mask).sum() / mask.sum(), rtol=1e-5)
    g = jax.grad(distillation_loss, argnums=(0, 1))(jnp.asarray(t_logits), jnp.asarray(t_logits))
    np.testing.assert_allclose(g[0], 0, atol=1e-7)
    np.testing.assert_array_equal(g[1], 0)  # nothing flows into the teacher
    # Train a bigram student on sequences sampled from a bigram teacher.
    teacher = jnp.asarray(rng.normal(size=(vocab, vocab)) * 2, jnp.float32)
    data = sample_from_teacher(lambda t: teacher[t], jax.random.key(2), num_sequences=32, length=8,
                               vocab_size=vocab)
    student, tx = jnp.zeros((vocab, vocab)), optax.adam(0.1)
    opt = tx.init(student)
    loss = lambda s: distillation_loss(s[data], teacher[data])
    first = float(loss(student))

    def step(carry, _):
        student, opt = carry
        u, opt = tx.update(jax.grad(loss)(student), opt)
        return (optax.apply_updates(student, u), opt), None

    (student, opt), _ = jax.lax.scan(step, (student, opt), None, length=60)
    assert float(loss(student)) < 0.05 * first


def test_registry_builds_each_scheme():
    rng = np.random.default_rng(8)
    x = jnp.asarray(rng.normal(size=(2, 3, 8)), jnp.float32)
    assert set(QUANT_SCHEMES) == {"none", "llm_qat_w4a8kv4", "bitnet", "bitnet158"}
    assert make_matmul("none", "bf16") is None
    assert isinstance(make_matmul("none", "fp8", history_len=4), Fp8Matmul)
    assert isinstance(make_matmul("bitnet158"), BitMatmul) and make_matmul("bitnet158").weight == "ternary"
    for name in QUANT_SCHEMES:
        lin = make_linear(name, 8, 5, rngs=nnx.Rngs(0))
        y = lin(x)
        assert y.shape == (2, 3, 5) and bool(jnp.all(jnp.isfinite(y)))
    lin = make_linear("llm_qat_w4a8kv4", 8, 5, rngs=nnx.Rngs(1))
    np.testing.assert_array_equal(lin(x).reshape(6, 5), QATMatmul()(x.reshape(6, 8), lin.kernel[...]))
    assert make_linear("none", 8, 5, rngs=nnx.Rngs(0), precision="bf16")(x).dtype == jnp.bfloat16


def test_packed_bytes():
    shape = (128, 96)
    n = math.prod(shape)
    assert packed_weight_bytes("none", shape) == 2 * n
    assert packed_weight_bytes("bitnet", shape) == n // 8 + 2
    assert packed_weight_bytes("bitnet158", shape) == -(-n // 5) + 2
    assert packed_weight_bytes("llm_qat_w4a8kv4", shape) == n // 2 + 2 * 96
    assert packed_weight_bytes("efficient_qat", shape, bits=4, group_size=64) == n // 2 + 4 * (n // 64)


def test_bad_scheme_input():
    with pytest.raises(ValueError, match="'int3'"):
        make_matmul("int3")
    with pytest.raises(ValueError, match="'fp4'"):
        make_matmul("none", "fp4")
    with pytest.raises(ValueError, match="bitnet.*fp8"):
        make_matmul("bitnet", "fp8")
    with pytest.raises(ValueError, match="w_bits=9"):
        QATMatmul(w_bits=9)
    with pytest.raises(ValueError, match="kv_bits=1"):
        quantize_kv(jnp.ones((1, 2, 1, 4)), jnp.ones((1, 2, 1, 4)), bits=1)
    with pytest.raises(ValueError, match="'quaternary'"):
        BitMatmul(weight="quaternary")
    with pytest.raises(ValueError, match="group_size=100 does not divide dimension 128"):
        packed_weight_bytes("efficient_qat", (128, 4), group_size=100)
    with pytest.raises(ValueError, match="greedy_prefix=5"):
        sample_from_teacher(lambda t: t, jax.random.key(0), num_sequences=1, length=5, vocab_size=3,
                            greedy_prefix=5)
