"""The NNX Transformer trains the same on a mesh as on one device, with the shardings derived
from its own logical-axis metadata (``param_axes``), a rule table and a ZeRO stage; and with
ring / Ulysses attention picked by ``TransformerConfig.attention``. Heavier: marked slow."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from sciscale_jax.models.transformer import Transformer, TransformerConfig
from sciscale_jax.parallel import ParallelConfig, batch_sharding, make_mesh, param_axes, rules_for, train_shardings

TX = optax.adam(1e-2, eps=1e-3)


def setup(attention):
    cfg = TransformerConfig(vocab_size=32, num_layers=2, num_heads=4, embed_dim=16, mlp_dim=24, max_len=16,
                            causal=True, scan_layers=True, attention=attention)
    with nnx.use_eager_sharding(False):
        model = Transformer(cfg, rngs=nnx.Rngs(0))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    rng = np.random.default_rng(0)
    tokens = jnp.asarray(rng.integers(0, 32, size=(4, 16)), jnp.int32)
    real = jnp.asarray(np.arange(16)[None, :] < np.array([16, 13, 16, 9])[:, None])  # padded rows
    return model, graphdef, nnx.to_pure_dict(params), nnx.to_pure_dict(rest), (tokens, real)


def train(attention, steps=2, mesh=None, strategy=None, zero=0):
    model, graphdef, params, rest, batch = setup(attention)

    def loss_fn(params, batch):
        tokens, real = batch
        logits = nnx.merge(graphdef, params, rest)(tokens, mask_bs=real)
        w = (real[:, 1:] & real[:, :-1]).astype(jnp.float32)
        nll = optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], tokens[:, 1:])
        return jnp.sum(nll * w) / jnp.sum(w)

    def step(params, opt_state, batch):
        loss, grads = jax.value_and_grad(loss_fn)(params, batch)
        updates, opt_state = TX.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss, grads

    opt_state = TX.init(params)
    if mesh is None:
        jitted = jax.jit(step)
    else:  # what a train step does with sciscale_jax.parallel
        rules = rules_for(strategy)
        sh = train_shardings(params, param_axes(model), rules, mesh, zero, TX)
        batch_sh = tuple(batch_sharding(x.shape, ("batch", "seq"), rules, mesh) for x in batch)
        jitted = jax.jit(step, in_shardings=(sh.params, sh.opt_state, batch_sh),
                         out_shardings=(sh.params, sh.opt_state, None, sh.grads))
        params, opt_state, batch = jax.device_put((params, opt_state, batch), (sh.params, sh.opt_state, batch_sh))
    losses, first = [], None
    with jax.set_mesh(mesh) if mesh is not None else nnx.use_eager_sharding(False):
        for _ in range(steps):
            params, opt_state, loss, grads = jitted(params, opt_state, batch)
            losses.append(float(loss))
            first = jax.device_get(grads) if first is None else first
    return np.array(losses), first, jax.device_get(params)


@pytest.mark.slow
@pytest.mark.parametrize("attention, sizes, strategy, zero", [
    ("xla", dict(data=2, fsdp=2, tensor=2), "fsdp_tp", 1),
    ("ring", dict(data=2, sequence=2, tensor=2), "tp", 0),
    ("ulysses", dict(data=2, sequence=4), "dp", 3),
])
def test_transformer_on_a_mesh_matches_one_device(attention, sizes, strategy, zero):
    ref_losses, ref_grads, ref_params = train("xla")
    losses, grads, params = train(attention, mesh=make_mesh(ParallelConfig(**sizes)), strategy=strategy, zero=zero)
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
    for got, want in ((grads, ref_grads), (params, ref_params)):
        for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
            err = np.linalg.norm(np.asarray(g, np.float64) - w) / np.linalg.norm(w)
            assert err < 1e-5, err
