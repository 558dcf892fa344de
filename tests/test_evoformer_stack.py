"""The whole Evoformer model (embedder, extra-MSA stack, Evoformer stack, heads): remat policies
(per block, per group of blocks, per sub-module) leave values and gradients unchanged, dropout
keys behave, bf16 compute and jax_enable_x64 work."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sciscale_jax.models.evoformer import Evoformer, EvoformerBlock
from test_evoformer import make_inputs, perturb, small_config
from test_evoformer_params import _inputs


def _loss_and_grads(model, args, kwargs, key=None):
    @nnx.jit
    def run(model, args, kwargs, key):
        def loss(model):
            out = model(*args, **kwargs, key=key)
            return (jnp.sum(jnp.sin(out["pair"])) + jnp.sum(jnp.cos(out["msa"]))
                    + jnp.sum(out["masked_msa_logits"] ** 2) + jnp.sum(out["distogram_logits"] ** 2))
        return nnx.value_and_grad(loss)(model)
    return run(model, args, kwargs, key)


_BASE = {}


def _base(with_grads=True):
    """The plain model and its inputs; its loss and gradients only when asked (a compile of its own)."""
    if not _BASE:
        model = perturb(Evoformer(small_config(num_blocks=2, num_extra_blocks=2), rngs=nnx.Rngs(0)), 1)
        args, kwargs = _inputs()
        _BASE.update(model=model, args=args, kwargs=kwargs)
    if with_grads and "result" not in _BASE:
        _BASE["result"] = _loss_and_grads(_BASE["model"], _BASE["args"], _BASE["kwargs"])
    return _BASE


@pytest.mark.parametrize("policy", [
    "every_k:2+modules",      # groups of 2 blocks, and every sub-module update checkpointed
    pytest.param("full", marks=pytest.mark.slow),
    pytest.param("selective", marks=pytest.mark.slow),
    pytest.param("custom:pair_bias=save,tri_proj=save,opm_proj=save", marks=pytest.mark.slow),
])
def test_remat_policies_keep_values_and_gradients(policy):
    base = _base()
    policy, plus, modules = policy.partition("+")
    model = Evoformer(small_config(num_blocks=2, num_extra_blocks=2, remat=policy,
                                   remat_modules=bool(modules)), rngs=nnx.Rngs(9))
    nnx.update(model, nnx.state(base["model"], nnx.Param))
    loss, grads = _loss_and_grads(model, base["args"], base["kwargs"])
    loss0, grads0 = base["result"]
    np.testing.assert_allclose(float(loss), float(loss0), rtol=1e-6)
    g, g0 = jax.tree.leaves(nnx.state(grads, nnx.Param)), jax.tree.leaves(nnx.state(grads0, nnx.Param))
    scale = max(float(jnp.abs(x).max()) for x in g0)
    for a, b in zip(g, g0, strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5 * scale)


def test_model_dropout_key():
    base = _base(with_grads=False)
    model, args, kwargs = base["model"], base["args"], base["kwargs"]
    run = nnx.jit(lambda model, args, kwargs, key: model(*args, **kwargs, key=key)["pair"])
    a, b = run(model, args, kwargs, jax.random.key(1)), run(model, args, kwargs, jax.random.key(1))
    c, plain = run(model, args, kwargs, jax.random.key(2)), run(model, args, kwargs, None)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert not np.allclose(np.asarray(a), np.asarray(c)) and not np.allclose(np.asarray(a), np.asarray(plain))


def test_bf16_and_x64():
    block = perturb(EvoformerBlock(small_config(), rngs=nnx.Rngs(0)), 1)
    m, z, msa_mask, pair_mask, _ = make_inputs(4)
    run = nnx.jit(lambda block, *a: block(*a))
    m32, z32 = run(block, m, z, msa_mask, pair_mask)
    with jax.enable_x64(True):
        m64, z64 = run(block, m, z, msa_mask, pair_mask)
    assert m64.dtype == jnp.float32 and z64.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(z64), np.asarray(z32), rtol=1e-5, atol=1e-5)
    half = EvoformerBlock(small_config(dtype="bfloat16"), rngs=nnx.Rngs(3))
    nnx.update(half, nnx.state(block, nnx.Param))
    m16, z16 = run(half, m, z, msa_mask, pair_mask)
    for lo, hi in ((m16, m32), (z16, z32)):
        lo, hi = np.asarray(lo, np.float32), np.asarray(hi)
        assert np.isfinite(lo).all()
        assert np.abs(lo - hi).max() < 0.05 * np.abs(hi).max()   # bf16 keeps ~3 significant digits
