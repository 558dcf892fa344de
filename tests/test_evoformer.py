"""The Evoformer against a float64 numpy transcription of AlphaFold 2's supplementary algorithms
(tests/evoformer_reference.py): every sub-module and a whole block, random non-default weights,
padded residues and MSA rows, odd sizes and a non-symmetric pair mask; invariance to garbage in
padding; AlphaFold's shared dropout; config validation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import evoformer_reference as ref
from sciscale_jax.models.evoformer import (DistogramHead, EvoformerBlock, EvoformerConfig, InputEmbedder,
                                           MaskedMsaHead, shared_dropout)

B, S, R = 2, 5, 11
SMALL = dict(c_m=16, c_z=8, c_e=8, msa_heads=2, msa_head_dim=4, pair_heads=2, pair_head_dim=4,
             extra_msa_heads=2, extra_msa_head_dim=4, opm_channels=4, tri_mul_channels=6, num_blocks=1,
             num_extra_blocks=1)


def small_config(**kw):
    return EvoformerConfig(**{**SMALL, **kw})


def perturb(module, seed, scale=0.3):
    """Add noise to every parameter, so zero-initialised projections and unit gate biases matter."""
    state = nnx.state(module, nnx.Param)
    leaves, treedef = jax.tree.flatten(state)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    new = [x + scale * jax.random.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys)]
    nnx.update(module, jax.tree.unflatten(treedef, new))
    return module


def make_inputs(seed=0, c_m=16, c_z=8):
    """m, z and masks with padded residues (last 2), a padded MSA row (last), holes, and a pair
    mask that is not symmetric."""
    rng = np.random.default_rng(seed)
    m = rng.normal(size=(B, S, R, c_m)).astype(np.float32)
    z = rng.normal(size=(B, R, R, c_z)).astype(np.float32)
    seq_mask = np.ones((B, R), np.float32)
    seq_mask[:, -2:] = 0
    seq_mask[1, 3] = 0
    msa_mask = seq_mask[:, None, :] * (rng.random((B, S, R)) > 0.15)
    msa_mask[:, -1] = 0
    pair_mask = seq_mask[:, :, None] * seq_mask[:, None, :] * (rng.random((B, R, R)) > 0.2)
    assert not np.array_equal(pair_mask, pair_mask.transpose(0, 2, 1))
    return m, z, msa_mask.astype(np.float32), pair_mask.astype(np.float32), seq_mask


def assert_close(out, expected, rtol=1e-5):
    """float32 against float64: relative 1e-5 plus an absolute floor scaled to the output's size."""
    out, expected = np.asarray(out, np.float64), np.asarray(expected)
    np.testing.assert_allclose(out, expected, rtol=rtol, atol=rtol * 2 * np.abs(expected).max())


def per_example(fn, *arrays):
    return np.stack([fn(*(np.asarray(a[b], np.float64) for a in arrays)) for b in range(B)])


@pytest.fixture(scope="module")
def blocks():
    cfg = small_config()
    return (perturb(EvoformerBlock(cfg, rngs=nnx.Rngs(0)), 1),
            perturb(EvoformerBlock(cfg, extra=True, rngs=nnx.Rngs(2)), 3))


@nnx.jit(static_argnames=("name",))
def _run_msa(block, name, m, z, msa_mask):
    mod = getattr(block, name)
    return mod(m, z, msa_mask) if name == "msa_row_attention_with_pair_bias" else mod(m, msa_mask)


@nnx.jit(static_argnames=("name",))
def _run_pair(block, name, z, pair_mask):
    return getattr(block, name)(z, pair_mask)


def test_msa_sub_modules_match_reference(blocks):
    block, extra = blocks
    m, z, msa_mask, pair_mask, _ = make_inputs(0)
    e = m[..., :8]
    cases = [
        (block, "msa_row_attention_with_pair_bias", m, lambda mm, zz, mk: ref.msa_row_attention(
            mm, zz, mk, block.msa_row_attention_with_pair_bias)),
        (extra, "msa_row_attention_with_pair_bias", e, lambda mm, zz, mk: ref.msa_row_attention(
            mm, zz, mk, extra.msa_row_attention_with_pair_bias)),
        (block, "msa_column_attention", m, lambda mm, zz, mk: ref.msa_column_attention(
            mm, mk, block.msa_column_attention)),
        (extra, "msa_column_global_attention", e, lambda mm, zz, mk: ref.msa_column_global_attention(
            mm, mk, extra.msa_column_global_attention)),
        (block, "outer_product_mean", m, lambda mm, zz, mk: ref.outer_product_mean(
            mm, mk, block.outer_product_mean)),
    ]
    for mod, name, x, reference in cases:
        out = _run_msa(mod, name, x, z, msa_mask)
        assert_close(out, per_example(reference, x, z, msa_mask))
    out = block.msa_transition(m)
    assert_close(out, per_example(lambda mm: ref.transition(mm, block.msa_transition), m))


@pytest.mark.parametrize("name", ["triangle_multiplication_outgoing", "triangle_multiplication_incoming",
                                  "triangle_attention_starting_node", "triangle_attention_ending_node",
                                  "pair_transition"])
def test_pair_sub_modules_match_reference(blocks, name):
    block = blocks[0]
    _, z, _, pair_mask, _ = make_inputs(1)
    mod = getattr(block, name)
    reference = {
        "triangle_multiplication_outgoing": lambda zz, pm: ref.triangle_multiplication(zz, pm, mod, True),
        "triangle_multiplication_incoming": lambda zz, pm: ref.triangle_multiplication(zz, pm, mod, False),
        "triangle_attention_starting_node": lambda zz, pm: ref.triangle_attention(zz, pm, mod, True),
        "triangle_attention_ending_node": lambda zz, pm: ref.triangle_attention(zz, pm, mod, False),
        "pair_transition": lambda zz, pm: ref.transition(zz, mod),
    }[name]
    assert_close(_run_pair(block, name, z, pair_mask), per_example(reference, z, pair_mask))


@nnx.jit
def _run_block(block, m, z, msa_mask, pair_mask):
    return block(m, z, msa_mask, pair_mask)


@pytest.mark.parametrize("extra", [False, True])
def test_block_matches_reference(blocks, extra):
    block = blocks[int(extra)]
    m, z, msa_mask, pair_mask, _ = make_inputs(2)
    if extra:
        m = m[..., :8]
    m_out, z_out = _run_block(block, m, z, msa_mask, pair_mask)
    expected = [ref.evoformer_block(*(np.asarray(a[b], np.float64) for a in (m, z, msa_mask, pair_mask)),
                                    block, extra=extra) for b in range(B)]
    assert_close(m_out, np.stack([e[0] for e in expected]))
    assert_close(z_out, np.stack([e[1] for e in expected]))


def test_padding_garbage_does_not_reach_real_positions(blocks):
    block = blocks[0]
    m, z, msa_mask, _, seq_mask = make_inputs(3)
    pair_mask = seq_mask[:, :, None] * seq_mask[:, None, :]     # padded residues only
    m_out, z_out = _run_block(block, m, z, msa_mask, pair_mask)
    rng = np.random.default_rng(9)
    msa_pad = (msa_mask == 0)[..., None]
    pair_pad = (pair_mask == 0)[..., None]
    m_bad = np.where(msa_pad, 1e3 * rng.normal(size=m.shape), m).astype(np.float32)
    z_bad = np.where(pair_pad, 1e3 * rng.normal(size=z.shape), z).astype(np.float32)
    m_out2, z_out2 = _run_block(block, m_bad, z_bad, msa_mask, pair_mask)
    real_m, real_z = ~msa_pad[..., 0], ~pair_pad[..., 0]
    assert np.isfinite(np.asarray(m_out2)).all() and np.isfinite(np.asarray(z_out2)).all()
    np.testing.assert_allclose(np.asarray(m_out2)[real_m], np.asarray(m_out)[real_m], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(z_out2)[real_z], np.asarray(z_out)[real_z], rtol=1e-5, atol=1e-5)


def test_embedder_and_heads_match_reference():
    cfg = small_config()
    emb = perturb(InputEmbedder(cfg, rngs=nnx.Rngs(4)), 5)
    msa_head = perturb(MaskedMsaHead(cfg, rngs=nnx.Rngs(6)), 7)
    dist_head = perturb(DistogramHead(cfg, rngs=nnx.Rngs(8)), 9)
    rng = np.random.default_rng(4)
    tf = rng.normal(size=(B, R, 22)).astype(np.float32)
    mf = rng.normal(size=(B, S, R, 49)).astype(np.float32)
    ri = np.stack([np.arange(R) * 9, np.arange(R)[::-1] + 100])   # offsets beyond +-32 get clipped
    m, z = emb(tf, mf, ri)
    for b in range(B):
        tf64, mf64 = tf[b].astype(np.float64), mf[b].astype(np.float64)
        m_ref = ref.linear(mf64, emb.preprocess_msa) + ref.linear(tf64, emb.preprocess_1d)[None]
        d = ri[b][:, None] - ri[b][None, :]
        onehot = np.eye(65)[np.clip(d, -32, 32) + 32]
        z_ref = (ref.linear(tf64, emb.left_single)[:, None] + ref.linear(tf64, emb.right_single)[None]
                 + ref.linear(onehot, emb.pair_activiations))
        assert_close(m[b], m_ref)
        assert_close(z[b], z_ref)
        assert_close(msa_head(m)[b], ref.linear(np.asarray(m[b], np.float64), msa_head.logits))
        half = ref.linear(np.asarray(z[b], np.float64), dist_head.half_logits)
        assert_close(dist_head(z)[b], half + half.transpose(1, 0, 2))
    assert msa_head(m).shape == (B, S, R, 23) and dist_head(z).shape == (B, R, R, 64)


def test_alphafold_initialisation():
    """Gates start at sigmoid(1) (weights 0, bias 1); every output projection starts at zero."""
    block = EvoformerBlock(small_config(), rngs=nnx.Rngs(0))
    att = block.msa_row_attention_with_pair_bias.attention
    assert not np.any(att.gating_w[...]) and np.all(att.gating_b[...] == 1.0)
    for mod in (block.msa_row_attention_with_pair_bias.attention, block.msa_column_attention.attention,
                block.triangle_attention_starting_node.attention, block.outer_product_mean):
        assert not np.any(mod.output_w[...]) and not np.any(mod.output_b[...])
    tri = block.triangle_multiplication_outgoing
    assert not np.any(tri.output_projection.weights[...]) and np.all(tri.gating_linear.bias[...] == 1.0)
    assert np.all(tri.left_gate.bias[...] == 1.0) and not np.any(block.pair_transition.transition2.weights[...])
    m, z, msa_mask, pair_mask, _ = make_inputs(5)
    m_out, z_out = _run_block(block, m, z, msa_mask, pair_mask)   # zero updates: identity at init
    np.testing.assert_array_equal(np.asarray(m_out), m)
    np.testing.assert_array_equal(np.asarray(z_out), z)


def test_shared_dropout_structure():
    x = jnp.ones((2, 7, 9, 5))
    for axis in (1, 2):
        y = np.asarray(shared_dropout(x, 0.25, jax.random.key(0), axis))
        assert set(np.unique(y).tolist()) <= {0.0, float(np.float32(1.0) / np.float32(0.75))}
        np.testing.assert_array_equal(y, np.take(y, [0], axis=axis).repeat(x.shape[axis], axis=axis))
        assert 0.1 < (y == 0).mean() < 0.4
    np.testing.assert_array_equal(np.asarray(shared_dropout(x, 0.25, None, 1)), np.asarray(x))


def _only(block, keep):
    """Zero the output projections of every update but ``keep``, so the block's change is that update."""
    def zero(p):
        p[...] = jnp.zeros_like(p[...])

    for name in ("msa_row_attention_with_pair_bias", "msa_column_attention", "triangle_attention_starting_node",
                 "triangle_attention_ending_node"):
        if name != keep:
            zero(getattr(block, name).attention.output_w)
            zero(getattr(block, name).attention.output_b)
    for name in ("triangle_multiplication_outgoing", "triangle_multiplication_incoming"):
        if name != keep:
            zero(getattr(block, name).output_projection.weights)
            zero(getattr(block, name).output_projection.bias)
    for name in ("msa_transition", "pair_transition"):
        zero(getattr(block, name).transition2.weights)
        zero(getattr(block, name).transition2.bias)
    zero(block.outer_product_mean.output_w)
    zero(block.outer_product_mean.output_b)
    return block


@nnx.jit
def _run_block_key(block, m, z, msa_mask, pair_mask, key):
    return block(m, z, msa_mask, pair_mask, key)


@pytest.mark.parametrize("keep,stream,shared_axis", [
    ("msa_row_attention_with_pair_bias", 0, 1),   # one mask for all MSA rows
    ("triangle_multiplication_incoming", 1, 1),   # shared along the first residue axis
    ("triangle_attention_ending_node", 1, 2),     # per column: shared along the second
])
def test_block_dropout_is_shared_along_alphafolds_axis(keep, stream, shared_axis):
    cfg = small_config()
    block = _only(perturb(EvoformerBlock(cfg, rngs=nnx.Rngs(0)), 11), keep)
    m, z, msa_mask, pair_mask, _ = make_inputs(6)
    msa_mask, pair_mask = np.ones_like(msa_mask), np.ones_like(pair_mask)
    base = (m, z)[stream]
    plain = np.asarray(_run_block(block, m, z, msa_mask, pair_mask)[stream]) - base
    dropped = np.asarray(_run_block_key(block, m, z, msa_mask, pair_mask, jax.random.key(3))[stream]) - base
    rate = cfg.msa_dropout if stream == 0 else cfg.pair_dropout
    zeroed = np.abs(dropped) < 1e-6 * np.abs(plain).max()
    assert 0.05 < zeroed.mean() < 0.5
    np.testing.assert_array_equal(zeroed, np.take(zeroed, [0], axis=shared_axis).repeat(
        zeroed.shape[shared_axis], axis=shared_axis))
    kept = ~zeroed
    np.testing.assert_allclose(dropped[kept], plain[kept] / (1 - rate), rtol=1e-4, atol=1e-5)
    again = np.asarray(_run_block(block, m, z, msa_mask, pair_mask)[stream]) - base
    np.testing.assert_array_equal(again, plain)   # no key: deterministic, no dropout


@pytest.mark.parametrize("kw,match", [
    (dict(c_m=0), "c_m=0"), (dict(chunk_size=0), "chunk_size=0"), (dict(msa_dropout=1.0), "msa_dropout"),
    (dict(attention="nope"), "nope"), (dict(attention="performer"), "approximate"),
    (dict(remat="every_k:2", num_blocks=3), "every_k"), (dict(num_extra_blocks=-1), "num_extra_blocks"),
])
def test_config_rejects_bad_values(kw, match):
    with pytest.raises(ValueError, match=match):
        small_config(**kw)


def test_chunking_with_block_remat_on_an_unrolled_stack_warns():
    """Chunked sub-modules under block remat keep every block's loop buffers when the stack is
    unrolled (benchmarks/evoformer_memory.py --scan-layers); the config says so once, and not
    when the stack is scanned, remat is off or there is one block."""
    with pytest.warns(UserWarning, match="scan_layers=True"):
        small_config(chunk_size=4, remat="full", num_blocks=2)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        small_config(chunk_size=4, remat="full", num_blocks=2, scan_layers=True)
        small_config(chunk_size=4, num_blocks=2)
        small_config(chunk_size=4, remat="full", num_blocks=1)
