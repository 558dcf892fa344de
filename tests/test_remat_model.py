"""The Transformer applies TransformerConfig.remat per block: same gradients, grouping, errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sciscale_jax.models.transformer import Transformer, TransformerConfig


def _grads(policy, scan, layers=4):
    cfg = TransformerConfig(vocab_size=13, num_layers=layers, num_heads=2, embed_dim=8, mlp_dim=12,
                            max_len=16, scan_layers=scan, remat=policy, dropout=0.1)
    graphdef, state = nnx.split(Transformer(cfg, rngs=nnx.Rngs(0)))
    tokens = jax.random.randint(jax.random.key(1), (2, 7), 0, 13)
    mask = jnp.arange(7)[None, :] < jnp.array([[7], [4]])  # padded second row

    def loss(st):
        logits = nnx.merge(graphdef, st)(tokens, mask_bs=mask, dropout_key=jax.random.key(2))
        return jnp.sum(jnp.sin(logits))

    return jax.jit(jax.grad(loss))(state)


class _Reference(dict):
    def __missing__(self, scan):  # computed on first use: the default selection needs only scan=True
        self[scan] = _grads("none", scan)
        return self[scan]


@pytest.fixture(scope="module")
def reference():
    return _Reference()


_CASES = [("full", True), ("every_k:2", True), ("selective", True),
          pytest.param("selective", False, marks=pytest.mark.slow),
          pytest.param("every_k:2", False, marks=pytest.mark.slow),
          pytest.param("dots_no_batch", True, marks=pytest.mark.slow),
          pytest.param("offload:qkv,mlp_hidden", True, marks=pytest.mark.slow),
          pytest.param({"attn_context": "save", "qkv": "offload"}, False, marks=pytest.mark.slow)]


@pytest.mark.parametrize("policy, scan", _CASES, ids=str)
def test_transformer_gradients_equal_across_policies(reference, policy, scan):
    """Dropout, padding and every parameter's gradient match the model without remat."""
    got, ref = _grads(policy, scan), reference[scan]
    for g, r in zip(jax.tree.leaves(got), jax.tree.leaves(ref)):
        g, r = np.asarray(g, np.float64), np.asarray(r, np.float64)
        assert np.abs(g - r).max() <= 1e-5 * np.abs(r).max()   # remat/scan reorder float32 sums (~1e-6 seen)


def test_transformer_rejects_every_k_not_dividing_depth():
    with pytest.raises(ValueError, match=r"every_k=3 does not divide num_layers=4"):
        TransformerConfig(vocab_size=13, num_layers=4, remat="every_k:3")
    with pytest.raises(ValueError, match=r"unknown checkpoint name\(s\) \['attn_scores'\]"):
        TransformerConfig(vocab_size=13, remat="offload:attn_scores")


@pytest.mark.parametrize("scan", [False, True])
def test_remat_policies_cut_the_compiled_train_step_on_both_paths(scan):
    """Compiled temporaries of the train step under the loop's XLA options (remat.compiler_options):
    full and selective keep less than none whether or not the layers are scanned."""
    import optax

    from sciscale_jax import remat
    from sciscale_jax.losses import mlm_loss
    from sciscale_jax.train import init_train_state, make_train_step

    rng = np.random.default_rng(0)
    batch = {"inputs": rng.integers(4, 29, (2, 256)).astype(np.int32),
             "targets": rng.integers(4, 29, (2, 256)).astype(np.int32),
             "weights": (rng.random((2, 256)) < 0.15).astype(np.float32), "mask": np.ones((2, 256), bool)}

    def temp(policy):
        cfg = TransformerConfig(vocab_size=32, num_layers=4, num_heads=4, embed_dim=64, mlp_dim=256, max_len=256,
                                remat=policy, scan_layers=scan)
        tx = optax.sgd(1e-3)
        graphdef, state = init_train_state(Transformer(cfg, rngs=nnx.Rngs(0)), tx)
        lowered = jax.jit(make_train_step(graphdef, tx, loss_fn=mlm_loss)).lower(state, batch)
        return lowered.compile(remat.compiler_options()).memory_analysis().temp_size_in_bytes

    none, full, selective = temp("none"), temp("full"), temp("selective")
    assert full <= 0.6 * none, (full, none)
    assert full < selective < none, (full, selective, none)
