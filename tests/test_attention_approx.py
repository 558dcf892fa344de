"""Approximate attention modules (Linformer, Performer) against their equations in float64.

Each module is checked against its paper's formula written plainly (quadratic form, no
prefix sums, no stabilisers) in float64 with the module's own projections or features;
Performer's estimate of exact softmax attention must improve with more features.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sciscale_jax.attention import LinformerAttention, LinformerProjection, PerformerAttention


def _qkv(rng, b, q_len, kv_len, heads, kv_heads, head_dim, scale=1.0):
    return tuple(rng.normal(size=s) * scale for s in ((b, q_len, heads, head_dim), (b, kv_len, kv_heads, head_dim),
                                                      (b, kv_len, kv_heads, head_dim)))


def _grads64(fn, q, k, v, cot, *extra):
    """Output and d<out, cot>/d(q, k, v, *extra) of a float64 function, as NumPy."""
    with jax.enable_x64(True):
        args = [jnp.asarray(x, jnp.float64) for x in (q, k, v) + extra]
        loss = lambda *a: (jnp.sum(fn(*a) * cot), fn(*a))  # noqa: E731
        grads, out = jax.jit(jax.grad(loss, tuple(range(len(args))), has_aux=True))(*args)
        return np.asarray(out), [np.asarray(g) for g in grads]


def _close(actual, expected, atol, name=""):
    actual = np.asarray(actual)
    assert actual.shape == expected.shape, name
    assert np.all(np.isfinite(actual)), name
    np.testing.assert_allclose(actual, expected, atol=atol, rtol=1e-3, err_msg=name)


def _keep_mask(rng, b, kv_len):
    keep = np.ones((b, 1, 1, kv_len), bool)
    keep[0, ..., kv_len - 3:] = False          # padding at the end of one element
    keep[1, ..., rng.random(kv_len) < 0.3] = False
    if b > 2:
        keep[2] = False                        # an element with no key at all
    return keep


# ----------------------------------------------------------------------------- Performer

def performer_reference(q, k, v, w, keep, causal):
    """FAVOR+ as a quadratic form: A = phi(q) phi(k)^T, masked, out = A v / A 1 (float64)."""
    heads, head_dim = q.shape[2:]
    k, v = (jnp.repeat(x, heads // k.shape[2], axis=2) for x in (k, v))
    root = head_dim ** -0.25
    phi = lambda x: jnp.exp(jnp.einsum("bshd,md->bshm", x * root, w)  # noqa: E731
                            - 0.5 * jnp.sum((x * root) ** 2, -1, keepdims=True)) / np.sqrt(w.shape[0])
    a_bhqk = jnp.einsum("bqhm,bkhm->bhqk", phi(q), phi(k))
    q_len, kv_len = q.shape[1], k.shape[1]
    valid = np.broadcast_to(keep.astype(bool), (q.shape[0], 1, 1, kv_len))
    if causal:
        valid = valid & (np.arange(kv_len)[None, :] <= np.arange(q_len)[:, None] + kv_len - q_len)
    a_bhqk = jnp.where(valid, a_bhqk, 0.0)
    total = a_bhqk.sum(-1, keepdims=True)
    return jnp.einsum("bhqk,bkhd->bqhd", a_bhqk / jnp.where(total > 0, total, 1.0), v)


@pytest.mark.parametrize("causal,q_len,kv_len,kv_heads", [
    (False, 9, 13, 2), (True, 14, 9, 2), (True, 7, 12, 2), pytest.param(True, 11, 11, 1, marks=pytest.mark.slow)])
def test_performer_matches_its_kernel_equation(causal, q_len, kv_len, kv_heads):
    rng = np.random.default_rng(0)
    b, heads, head_dim = 3, 4, 8
    q, k, v = _qkv(rng, b, q_len, kv_len, heads, kv_heads, head_dim, scale=0.7)
    keep = _keep_mask(rng, b, kv_len)
    module = PerformerAttention(head_dim, 24, causal_chunk=4, rngs=nnx.Rngs(1))  # several chunks
    w = np.asarray(module.draw_features(step=5))
    cot = rng.normal(size=q.shape)
    ref_out, ref_grads = _grads64(lambda q, k, v, w: performer_reference(q, k, v, w, keep, causal), q, k, v, cot, w)

    def run(q, k, v):
        return module(q, k, v, mask=jnp.asarray(keep), causal=causal, step=5)
    args = [jnp.asarray(x, jnp.float32) for x in (q, k, v)]
    loss = lambda *a: (jnp.sum(run(*a) * cot), run(*a))  # noqa: E731
    grads, out = jax.jit(jax.grad(loss, (0, 1, 2), has_aux=True))(*args)
    _close(out, ref_out, 2e-5, "out")
    for name, g, g_ref in zip(("dq", "dk", "dv"), grads, ref_grads):
        _close(g, g_ref, 1e-4, name)
    assert np.all(np.asarray(out)[2] == 0.0)  # no key at all: zeros
    if q_len > kv_len and causal:
        assert np.all(np.asarray(out)[:, : q_len - kv_len] == 0.0)  # queries before the first key


def _exact64(q, k, v):
    s = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(q.shape[-1])
    p = np.exp(s - s.max(-1, keepdims=True))
    return np.einsum("bhqk,bkhd->bqhd", p / p.sum(-1, keepdims=True), v)


def test_performer_error_shrinks_with_more_features():
    rng = np.random.default_rng(2)
    q, k, v = _qkv(rng, 2, 16, 16, 2, 2, 8, scale=0.6)
    exact = _exact64(q, k, v)
    qf, kf, vf = (jnp.asarray(x, jnp.float32) for x in (q, k, v))
    errors = []
    for m in (8, 64, 512):
        module = PerformerAttention(8, m, rngs=nnx.Rngs(0))
        run = jax.jit(lambda key: module(qf, kf, vf, key=key))  # noqa: B023  (one key per call: compiles faster than vmap)
        outs = np.stack([np.asarray(run(key)) for key in jax.random.split(jax.random.key(0), 6)])
        per_key = np.abs(outs - exact[None]).mean(axis=(1, 2, 3, 4))
        errors.append(float(np.mean(per_key)))
    assert errors[0] > errors[1] > errors[2], errors
    assert errors[2] < 0.4 * errors[0], errors


def test_performer_features_orthogonal_and_redraw_explicit():
    module = PerformerAttention(8, 20, redraw_interval=100, rngs=nnx.Rngs(3))
    w = np.asarray(module.draw_features(), np.float64)
    assert w.shape == (20, 8)
    for start in (0, 8, 16):  # rows within each orthogonal block are orthogonal
        block = w[start:start + 8]
        gram = block @ block.T
        np.testing.assert_allclose(gram - np.diag(np.diag(gram)), 0.0, atol=1e-4)
    assert np.std(np.linalg.norm(w, axis=1)) > 0.05  # chi-distributed lengths, not unit rows
    seed_before = np.asarray(module.seed[...]).copy()
    same = [np.asarray(module.draw_features(step=s)) for s in (0, 99)]
    np.testing.assert_array_equal(same[0], same[1])
    assert not np.allclose(same[0], np.asarray(module.draw_features(step=100)))
    assert not np.allclose(np.asarray(module.draw_features(key=jax.random.key(9))), same[0])
    q = jnp.asarray(np.random.default_rng(4).normal(size=(1, 5, 2, 8)), jnp.float32)
    out_a = module(q, q, q, step=0)
    out_b = module(q, q, q, step=100)
    assert not np.allclose(np.asarray(out_a), np.asarray(out_b))
    np.testing.assert_array_equal(np.asarray(module.seed[...]), seed_before)  # no hidden mutation
    np.testing.assert_array_equal(np.asarray(module(q, q, q, step=0)), np.asarray(out_a))


def test_performer_refuses_what_it_cannot_honour():
    module = PerformerAttention(8, 16, rngs=nnx.Rngs(0))
    q = jnp.ones((2, 5, 2, 8), jnp.float32) * 0.1
    with pytest.raises(ValueError, match=r"cannot honour an additive bias.*\(1, 2, 5, 5\)"):
        module(q, q, q, bias=jnp.zeros((1, 2, 5, 5)))
    with pytest.raises(ValueError, match=r"key padding masks \[batch, 1, 1, kv_len\] only; got mask of shape \(2, 1, 5, 5\)"):
        module(q, q, q, mask=jnp.ones((2, 1, 5, 5), bool))
    with pytest.raises(ValueError, match="head_dim=4 of q differs from the module's head_dim=8"):
        module(q[..., :4], q[..., :4], q[..., :4])
    with pytest.raises(ValueError, match="num_features=0 must be a positive integer"):
        PerformerAttention(8, 0, rngs=nnx.Rngs(0))


# ----------------------------------------------------------------------------- Linformer

def linformer_reference(q, k, v, e, f, keep):
    """softmax(q (E k~)^T * scale) (F v~) with k~, v~ zero at padded keys (float64)."""
    heads, head_dim = q.shape[2:]
    keep_bk = np.broadcast_to(keep.reshape(keep.shape[0], -1), (q.shape[0], k.shape[1]))
    k, v = (jnp.where(keep_bk[:, :, None, None], x, 0.0) for x in (k, v))
    kp, vp = jnp.einsum("pk,bkhd->bphd", e, k), jnp.einsum("pk,bkhd->bphd", f, v)
    kp, vp = (jnp.repeat(x, heads // x.shape[2], axis=2) for x in (kp, vp))
    s = jnp.einsum("bqhd,bphd->bhqp", q, kp) / np.sqrt(head_dim)
    out = jnp.einsum("bhqp,bphd->bqhd", jax.nn.softmax(s, axis=-1), vp)
    return jnp.where(keep_bk.any(-1)[:, None, None, None], out, 0.0)


@pytest.mark.parametrize("share_kv,kv_heads", [(False, 2), (True, 4)])
def test_linformer_matches_projected_equation(share_kv, kv_heads):
    rng = np.random.default_rng(5)
    b, q_len, kv_len, heads, head_dim, max_len, proj_len = 3, 13, 13, 4, 8, 16, 5
    q, k, v = _qkv(rng, b, q_len, kv_len, heads, kv_heads, head_dim)
    keep = _keep_mask(rng, b, kv_len)
    module = LinformerAttention(max_len, proj_len, share_kv=share_kv, rngs=nnx.Rngs(6))
    e = np.asarray(module.projection.key_proj[...])
    f = e if share_kv else np.asarray(module.projection.value_proj[...])
    cot = rng.normal(size=q.shape)
    ref_out, ref_grads = _grads64(
        lambda q, k, v, e, f: linformer_reference(q, k, v, e[:, :kv_len], f[:, :kv_len], keep), q, k, v, cot, e, f)

    graphdef, params = nnx.split(module)

    def loss(params, q, k, v):
        out = nnx.merge(graphdef, params)(q, k, v, mask=jnp.asarray(keep))
        return jnp.sum(out * cot), out
    args = [jnp.asarray(x, jnp.float32) for x in (q, k, v)]
    (g_params, *grads), out = jax.jit(jax.grad(loss, (0, 1, 2, 3), has_aux=True))(params, *args)
    _close(out, ref_out, 2e-5, "out")
    for name, g, g_ref in zip(("dq", "dk", "dv"), grads, ref_grads):
        _close(g, g_ref, 1e-4, name)
    de = np.asarray(g_params["projection"]["key_proj"][...])
    if share_kv:  # one matrix: its gradient is the sum of both roles
        _close(de, ref_grads[3] + ref_grads[4], 1e-4, "dE")
    else:
        _close(de, ref_grads[3], 1e-4, "dE")
        _close(np.asarray(g_params["projection"]["value_proj"][...]), ref_grads[4], 1e-4, "dF")
    assert np.all(np.asarray(out)[2] == 0.0)


def test_linformer_with_identity_projection_is_exact_attention():
    rng = np.random.default_rng(7)
    q, k, v = _qkv(rng, 2, 9, 9, 2, 2, 8)
    module = LinformerAttention(9, 9, rngs=nnx.Rngs(0))
    module.projection.key_proj[...] = jnp.eye(9)
    module.projection.value_proj[...] = jnp.eye(9)
    out = module(*(jnp.asarray(x, jnp.float32) for x in (q, k, v)))
    np.testing.assert_allclose(np.asarray(out), _exact64(q, k, v), atol=2e-5)


def test_linformer_ignores_padded_content():
    rng = np.random.default_rng(8)
    q, k, v = (jnp.asarray(x, jnp.float32) for x in _qkv(rng, 2, 7, 10, 2, 2, 8))
    keep = np.ones((2, 1, 1, 10), bool)
    keep[:, ..., 6:] = False
    module = LinformerAttention(12, 4, rngs=nnx.Rngs(1))
    out = module(q, k, v, mask=jnp.asarray(keep))
    noise = jnp.asarray(rng.normal(size=k.shape) * 100, jnp.float32) * (~keep[:, 0, 0, :, None, None])
    np.testing.assert_allclose(np.asarray(module(q, k + noise, v - noise, mask=jnp.asarray(keep))), np.asarray(out),
                               atol=1e-6)
    assert not np.allclose(np.asarray(module(q, k + noise, v - noise)), np.asarray(out))


def test_linformer_projection_shared_across_layers():
    shared = LinformerProjection(16, 4, rngs=nnx.Rngs(0))

    class TwoLayers(nnx.Module):
        def __init__(self):
            self.a = LinformerAttention(16, 4, projection=shared, rngs=nnx.Rngs(1))
            self.b = LinformerAttention(16, 4, projection=shared, rngs=nnx.Rngs(2))
    model = TwoLayers()
    assert model.a.projection is model.b.projection
    assert len(jax.tree.leaves(nnx.state(model, nnx.Param))) == 2  # one E and one F, not four


def test_linformer_refuses_what_it_cannot_honour():
    module = LinformerAttention(8, 4, rngs=nnx.Rngs(0))
    q = jnp.ones((2, 5, 2, 8), jnp.float32)
    with pytest.raises(ValueError, match="Linformer cannot honour causal=True"):
        module(q, q, q, causal=True)
    with pytest.raises(ValueError, match=r"cannot honour an additive bias.*\(2, 1, 1, 5\)"):
        module(q, q, q, bias=jnp.zeros((2, 1, 1, 5)))
    with pytest.raises(ValueError, match=r"got mask of shape \(1, 2, 1, 5\)"):
        module(q, q, q, mask=jnp.ones((1, 2, 1, 5), bool))
    long = jnp.ones((2, 9, 2, 8), jnp.float32)
    with pytest.raises(ValueError, match="kv_len=9 exceeds the Linformer projection's max_len=8"):
        module(long, long, long)
    with pytest.raises(ValueError, match="shared projection has max_len=8, proj_len=4"):
        LinformerAttention(16, 4, projection=module.projection, rngs=nnx.Rngs(0))


# ----------------------------------------------------------------------------- in the Transformer

@pytest.mark.parametrize("name", ["linformer", "performer"])
def test_transformer_selects_approximate_attention(name):
    from sciscale_jax.models.transformer import Transformer, TransformerConfig
    cfg = TransformerConfig(vocab_size=11, num_layers=1, num_heads=2, embed_dim=16, mlp_dim=32, max_len=24,
                            attention=name)
    model = Transformer(cfg, rngs=nnx.Rngs(0))
    module = model.layers[0].attn.approx
    assert isinstance(module, LinformerAttention if name == "linformer" else PerformerAttention)
    tokens = jnp.asarray(np.random.default_rng(9).integers(0, 11, (2, 13)))
    mask = jnp.arange(13)[None, :] < jnp.array([[13], [9]])
    forward = nnx.jit(lambda m, t: m(t, mask_bs=mask))
    out = forward(model, tokens)
    # padding honoured: changing padded tokens leaves the real tokens' logits unchanged
    changed = forward(model, tokens.at[1, 9:].set((tokens[1, 9:] + 1) % 11))
    np.testing.assert_allclose(np.asarray(changed[1, :9]), np.asarray(out[1, :9]), atol=1e-5)
    grads = nnx.jit(nnx.grad(lambda m: m(tokens, mask_bs=mask).mean()))(model)
    assert all(np.all(np.isfinite(np.asarray(g))) for g in jax.tree.leaves(nnx.state(grads, nnx.Param)))
    if name == "linformer":
        with pytest.raises(ValueError, match="cannot be causal"):
            Transformer(TransformerConfig(vocab_size=11, num_layers=1, attention=name, causal=True), rngs=nnx.Rngs(0))
