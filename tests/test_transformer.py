"""Transformer: causality, scan/unrolled equivalence, padding masks, config validation."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sciscale_jax.models import Transformer, TransformerConfig

CFG = TransformerConfig(vocab_size=29, num_layers=3, num_heads=4, embed_dim=32, mlp_dim=48, max_len=64)


def _tokens(key=0, shape=(2, 11)):
    return jax.random.randint(jax.random.key(key), shape, 4, 29)


@pytest.mark.parametrize("causal", [True, False])
def test_causality(causal):
    model = Transformer(dataclasses.replace(CFG, causal=causal), rngs=nnx.Rngs(0))
    tokens = _tokens()
    changed = tokens.at[:, 7].set((tokens[:, 7] + 5) % 25 + 4)
    before, after = model(tokens), model(changed)
    earlier_diff = float(jnp.max(jnp.abs(before[:, :7] - after[:, :7])))
    if causal:
        assert earlier_diff == 0.0  # a later token never reaches earlier logits
    else:
        assert earlier_diff > 1e-4  # the encoder sees both directions
    assert float(jnp.max(jnp.abs(before[:, 7:] - after[:, 7:]))) > 1e-4


@pytest.mark.parametrize("mlp", ["swiglu", "gelu"])
def test_scan_layers_matches_unrolled(mlp):
    cfg = dataclasses.replace(CFG, mlp=mlp)
    unrolled = Transformer(cfg, rngs=nnx.Rngs(1))
    scanned = Transformer(dataclasses.replace(cfg, scan_layers=True), rngs=nnx.Rngs(2))
    _, p_unrolled = nnx.split(unrolled, nnx.Param)
    _, p_scanned = nnx.split(scanned, nnx.Param)
    pure_u, pure_s = nnx.to_pure_dict(p_unrolled), nnx.to_pure_dict(p_scanned)
    # Stack the unrolled layers' parameters along a leading axis: the scanned layout.
    layers = [pure_u["layers"][i] for i in range(cfg.num_layers)]
    pure_s["layers"] = jax.tree.map(lambda *xs: jnp.stack(xs), *layers)
    for key in ("embed", "final_norm", "lm_head"):
        pure_s[key] = pure_u[key]
    nnx.replace_by_pure_dict(p_scanned, pure_s)
    nnx.update(scanned, p_scanned)
    tokens = _tokens(3)
    mask = jnp.arange(11)[None, :] < jnp.array([[11], [8]])
    np.testing.assert_allclose(scanned(tokens, mask_bs=mask), unrolled(tokens, mask_bs=mask), rtol=1e-5, atol=1e-5)


def test_padding_keys_are_not_attended():
    model = Transformer(CFG, rngs=nnx.Rngs(0))
    tokens = _tokens(4)
    mask = jnp.arange(11)[None, :] < 6
    other = tokens.at[:, 6:].set(7)  # change only padded positions
    a, b = model(tokens, mask_bs=mask), model(other, mask_bs=mask)
    np.testing.assert_array_equal(a[:, :6], b[:, :6])


def test_dropout_is_keyed_and_off_without_key():
    model = Transformer(dataclasses.replace(CFG, dropout=0.3), rngs=nnx.Rngs(0))
    tokens = _tokens(5)
    np.testing.assert_array_equal(model(tokens), model(tokens))
    k = jax.random.key(9)
    np.testing.assert_array_equal(model(tokens, dropout_key=k), model(tokens, dropout_key=k))
    assert float(jnp.max(jnp.abs(model(tokens, dropout_key=k) - model(tokens)))) > 1e-3


def test_parameters_carry_logical_axes():
    model = Transformer(dataclasses.replace(CFG, scan_layers=True), rngs=nnx.Rngs(0))
    specs = nnx.get_partition_spec(nnx.split(model, nnx.Param)[1])
    assert tuple(specs["layers"]["attn"]["query"]["kernel"].get_value()) == ("layers", "embed", "heads", "kv")
    assert tuple(specs["embed"].get_value()) == ("vocab", "embed")
    assert tuple(specs["lm_head"]["kernel"].get_value()) == ("embed", "vocab")


@pytest.mark.parametrize("kwargs, message", [
    (dict(embed_dim=30, num_heads=4), "embed_dim=30 is not divisible by num_heads=4"),
    (dict(remat="sometimes"), "unknown remat policy 'sometimes'"),
    (dict(attention="magic"), "unknown attention implementation 'magic'"),
    (dict(num_layers=0), "num_layers=0"),
    (dict(mlp="relu6"), "unknown mlp 'relu6'"),
])
def test_bad_config(kwargs, message):
    with pytest.raises(ValueError, match=message):
        dataclasses.replace(CFG, **kwargs)


def test_sequence_longer_than_max_len():
    model = Transformer(dataclasses.replace(CFG, max_len=8), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="sequence length 11 exceeds max_len=8"):
        model(_tokens())
