"""A second model family as a pipeline: the msa-evoformer recipe's Evoformer stack (a (msa, pair)
carry through every stage) gives the single-device loss and gradients under every schedule."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from sciscale_jax.parallel import ParallelConfig, make_mesh
from sciscale_jax.recipes import get_recipe
from sciscale_jax.train.step import backprop_grad_fn, split_model

RECIPE = get_recipe("msa-evoformer")
S, R = 3, 5  # MSA rows, residues (odd sizes)


@functools.cache  # the reference and the pipelined run of a case take the same model and batch
def make(num_blocks, batch_size):
    cfg = RECIPE.make_config(c_m=8, c_z=4, msa_heads=2, msa_head_dim=4, pair_heads=2, pair_head_dim=4,
                             opm_channels=4, tri_mul_channels=4, num_blocks=num_blocks, num_seq=S,
                             scan_layers=True)
    model = RECIPE.build_model(cfg, nnx.Rngs(0))
    rng = np.random.default_rng(1)
    # AlphaFold zero-initialises output projections (the masked-MSA head too): perturb every
    # parameter so that no gradient is zero by construction
    graphdef, params, rest = split_model(model)
    params = jax.tree.map(lambda x: jnp.asarray(np.asarray(x) + 0.2 * rng.standard_normal(x.shape), x.dtype), params)
    msa_mask = (rng.random((batch_size, S, R)) < 0.9).astype(np.float32)
    seq_mask = (rng.random((batch_size, R)) < 0.9).astype(np.float32)
    batch = {"msa": jnp.asarray(rng.integers(0, 23, (batch_size, S, R)), jnp.int32),
             "target": jnp.asarray(rng.integers(0, 23, (batch_size, S, R)), jnp.int32),
             "bert_mask": jnp.asarray(rng.random((batch_size, S, R)) < 0.4, jnp.float32),
             "msa_mask": jnp.asarray(msa_mask), "seq_mask": jnp.asarray(seq_mask),
             "residue_index": jnp.asarray(np.tile(np.arange(R), (batch_size, 1)), jnp.int32)}
    return (graphdef, params, rest), batch


_REFERENCE = {}  # (num_blocks, batch size) -> the one-device loss, count and gradients, computed once


def reference(num_blocks, batch_size):
    if (num_blocks, batch_size) not in _REFERENCE:
        (graphdef, params, rest), batch = make(num_blocks, batch_size)
        _REFERENCE[num_blocks, batch_size] = jax.jit(backprop_grad_fn(graphdef, RECIPE.loss_fn))(
            params, rest, batch, None)
    return _REFERENCE[num_blocks, batch_size]


def check(schedule, p, m, v=1, data=1, num_blocks=3, batch_size=None, grad_tol=1e-5):
    batch_size = batch_size or m * data * 2
    (graphdef, params, rest), batch = make(num_blocks, batch_size)
    mesh = make_mesh(ParallelConfig(pipeline=p, data=data), jax.devices()[:p * data])
    grad_fn = RECIPE.pipeline.grad_fn(graphdef, mesh=mesh, schedule=schedule, microbatches=m, virtual_stages=v)
    loss, (count, _), grads = jax.jit(grad_fn)(params, rest, batch, None)
    ref_loss, (ref_count, _), ref_grads = reference(num_blocks, batch_size)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
    np.testing.assert_allclose(count, ref_count)
    assert jax.tree.structure(grads) == jax.tree.structure(ref_grads)
    blocks = grads["evoformer"]["evoformer_stack"]["blocks"]
    assert jax.tree.leaves(blocks)[0].shape[0] == num_blocks
    # atol on the scale of all gradients: a few leaves (biases a softmax or norm cancels) are zero
    # in exact arithmetic and only rounding noise in float32
    scale = max(float(jnp.max(jnp.abs(r))) for r in jax.tree.leaves(ref_grads))
    for g, r in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)):
        np.testing.assert_allclose(g, r, rtol=grad_tol, atol=grad_tol * scale)
    assert float(optax.tree.norm(blocks)) > 1e-3 * scale  # the stack's gradients are not zero by construction


# 3 blocks over 2 stages (2 + 1); 5 over 4 interleaved stages (2 + 1 + 1 + 1); m not a multiple of p
# in the slow cases. One fast case (ZB-H1: forward, input-gradient and weight-gradient branches,
# data x pipeline, 2 microbatches: a third costs half again the compile time); the schedules' own
# logic, m not a multiple of p included, is checked fast on the MLP stack and the Transformer. Same
# batch of 12 rows for every p = 2 case, so the one-device reference is computed once.
@pytest.mark.parametrize("schedule,p,m,v,data,num_blocks", [
    ("zbh1", 2, 2, 1, 2, 3),
    pytest.param("1f1b", 2, 3, 1, 2, 3, marks=pytest.mark.slow),
    pytest.param("gpipe", 2, 3, 1, 1, 3, marks=pytest.mark.slow),
    pytest.param("interleaved", 2, 2, 2, 1, 5, marks=pytest.mark.slow)])
def test_evoformer_matches_single_device(schedule, p, m, v, data, num_blocks):
    check(schedule, p, m, v, data, num_blocks, batch_size=12)


@pytest.mark.slow
@pytest.mark.parametrize("schedule,p,m,v,data", [
    ("1f1b", 4, 5, 1, 2), ("zbh1", 4, 4, 1, 2), ("gpipe", 8, 8, 1, 1), ("1f1b", 8, 9, 1, 1), ("zbh1", 8, 8, 1, 1)])
def test_evoformer_matches_single_device_deeper(schedule, p, m, v, data):
    # up to 9 blocks of perturbed weights: float32 rounding of the reordered microbatch sums grows
    # with depth (gpipe p=8: one gradient element off by 1.4e-4 relative, 4.5e-5 absolute at 1e-5
    # tolerance), so gradients are held to 1e-4 here; the loss to 1e-5
    check(schedule, p, m, v, data, num_blocks=p + 1, grad_tol=1e-4)


@pytest.mark.slow
def test_evoformer_interleaved_deeper_matches_single_device():
    check("interleaved", 4, 4, 2, 1, num_blocks=9, grad_tol=1e-4)  # 9 blocks over 8 virtual stages (2 + 1 x 7)


@pytest.mark.slow  # the key's path through the pipeline runs fast on the Transformer (test_pipeline_model.py)
def test_evoformer_dropout_keys_reach_every_stage():
    """With a step key the pipelined Evoformer draws dropout: the same key gives the same loss and
    gradients, another key another loss (one compiled function)."""
    (graphdef, params, rest), batch = make(2, 4)
    mesh = make_mesh(ParallelConfig(pipeline=2), jax.devices()[:2])
    grad_fn = jax.jit(RECIPE.pipeline.grad_fn(graphdef, mesh=mesh, schedule="1f1b", microbatches=2))
    a = grad_fn(params, rest, batch, jax.random.key(3))
    b = grad_fn(params, rest, batch, jax.random.key(3))
    c = grad_fn(params, rest, batch, jax.random.key(4))
    assert float(a[0]) == float(b[0]) and abs(float(a[0]) - float(c[0])) > 1e-6
    for x, y in zip(jax.tree.leaves(a[2]), jax.tree.leaves(b[2])):
        np.testing.assert_array_equal(x, y)
