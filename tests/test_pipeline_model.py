"""The protein Transformer's layer stack as a pipeline: token-mean loss and gradients equal the
single-device train step's (uneven layers per stage, embedding first, head last)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sciscale_jax.losses import mlm_loss, token_cross_entropy
from sciscale_jax.models.transformer import Transformer, TransformerConfig
from sciscale_jax.parallel import ParallelConfig, make_mesh
from sciscale_jax.parallel.pipeline_model import merge_stages, pipeline_grad_fn, split_stages, stage_layer_counts
from sciscale_jax.train.step import backprop_grad_fn, split_model

VOCAB, SEQ = 23, 8


# The four adapters a recipe supplies for its model (here: the Transformer under mlm_loss).
def embed_fn(model, b):
    return jnp.take(model.embed[...], b["inputs"], axis=0).astype(model.config.dtype)


def block_args_fn(b):  # Block(x, positions, mask, segments, key): rows not packed
    batch, seq = b["inputs"].shape
    return jnp.broadcast_to(jnp.arange(seq), (batch, seq)), b["mask"][:, None, None, :].astype(bool), None


def head_fn(model, h, b):
    logits = model.lm_head(model.final_norm(h)).astype(jnp.float32)
    return token_cross_entropy(logits, b["targets"], b["weights"])[0]


def count_fn(b):
    return jnp.sum(b["weights"].astype(jnp.float32))


def make(num_layers, batch_size, remat="none", **model_kw):
    cfg = TransformerConfig(vocab_size=VOCAB, num_layers=num_layers, num_heads=2, embed_dim=16, mlp_dim=24,
                            max_len=SEQ, scan_layers=True, remat=remat, **model_kw)
    model = Transformer(cfg, rngs=nnx.Rngs(0))
    rng = np.random.default_rng(1)
    mask = rng.random((batch_size, SEQ)) < 0.9
    mask[:, 0] = True
    batch = {"inputs": jnp.asarray(rng.integers(0, VOCAB, (batch_size, SEQ)), jnp.int32),
             "targets": jnp.asarray(rng.integers(0, VOCAB, (batch_size, SEQ)), jnp.int32),
             "mask": jnp.asarray(mask),
             "weights": jnp.asarray((rng.random((batch_size, SEQ)) < 0.5) & mask, jnp.float32)}
    return split_model(model), batch


def test_split_and_merge_stages_uneven():
    assert stage_layer_counts(7, 3) == [3, 2, 2]
    layers = {"w": jnp.arange(7 * 2, dtype=jnp.float32).reshape(7, 2)}
    st = split_stages(layers, 3)
    assert st["layers"]["w"].shape == (3, 3, 2)
    np.testing.assert_array_equal(st["valid"], [[1, 1, 1], [1, 1, 0], [1, 1, 0]])
    np.testing.assert_array_equal(st["layers"]["w"][1, :2], layers["w"][3:5])
    np.testing.assert_array_equal(merge_stages(st, 7)["w"], layers["w"])
    with pytest.raises(ValueError, match="num_layers=3 is fewer than pipeline stages x virtual stages = 4"):
        split_stages({"w": jnp.zeros((3, 2))}, 4)


def check(schedule, p, m, v=1, data=1, num_layers=5, remat="none"):
    (graphdef, params, rest), batch = make(num_layers, m * data * 2, remat)
    mesh = make_mesh(ParallelConfig(pipeline=p, data=data), jax.devices()[:p * data])
    grad_fn = pipeline_grad_fn(graphdef, mesh=mesh, embed_fn=embed_fn, block_args_fn=block_args_fn, head_fn=head_fn,
                               count_fn=count_fn, schedule=schedule, microbatches=m, virtual_stages=v)
    loss, (count, _), grads = jax.jit(grad_fn)(params, rest, batch, None)
    ref_loss, (ref_count, _), ref_grads = jax.jit(backprop_grad_fn(graphdef, mlm_loss))(params, rest, batch, None)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
    np.testing.assert_allclose(count, ref_count)
    assert jax.tree.structure(grads) == jax.tree.structure(ref_grads)
    for g, r in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)):
        np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-5 * float(jnp.max(jnp.abs(r))))


# 5 layers over 2 (3 + 2) and 4 (2 + 1 + 1 + 1) stages; 1f1b on data x pipeline (x fsdp) runs fast
# in test_transformer_fsdp_inside_stages_matches_single_device_and_shards_parameters
@pytest.mark.parametrize("schedule,p,m,v,data", [
    pytest.param("1f1b", 2, 3, 1, 2, marks=pytest.mark.slow), ("interleaved", 2, 2, 2, 1)])
def test_transformer_matches_single_device(schedule, p, m, v, data):
    check(schedule, p, m, v, data)


@pytest.mark.slow
@pytest.mark.parametrize("schedule,p,m,v,data,remat", [
    ("gpipe", 4, 4, 1, 2, "none"), ("zbh1", 4, 5, 1, 1, "full"), ("zbh1", 2, 4, 1, 4, "none"),
    ("interleaved", 4, 4, 2, 1, "full")])
def test_transformer_matches_single_device_more(schedule, p, m, v, data, remat):
    check(schedule, p, m, v, data, num_layers=9, remat=remat)


def test_transformer_bad_input():
    (graphdef, params, rest), batch = make(3, 8)
    mesh = make_mesh(ParallelConfig(pipeline=4), jax.devices()[:4])
    grad_fn = pipeline_grad_fn(graphdef, mesh=mesh, embed_fn=embed_fn, block_args_fn=block_args_fn, head_fn=head_fn,
                               count_fn=count_fn, schedule="1f1b", microbatches=4)
    with pytest.raises(ValueError, match="num_layers=3 is fewer than pipeline stages x virtual stages = 4 x 1"):
        grad_fn(params, rest, batch)
    with pytest.raises(ValueError, match="unknown pipeline schedule 'pipedream'"):
        pipeline_grad_fn(graphdef, mesh=mesh, embed_fn=embed_fn, block_args_fn=block_args_fn, head_fn=head_fn,
                         count_fn=count_fn, schedule="pipedream", microbatches=4)


def test_split_and_merge_stages_even():
    layers = {"w": jnp.arange(6 * 2, dtype=jnp.float32).reshape(6, 2)}
    st = split_stages(layers, 3)
    np.testing.assert_array_equal(st["layers"]["w"][2], layers["w"][4:6])
    np.testing.assert_array_equal(st["valid"], np.ones((3, 2)))
    np.testing.assert_array_equal(merge_stages(st, 6)["w"], layers["w"])


def test_transformer_tensor_x_pipeline_matches_single_device():
    """pipeline=2 x tensor=2: the stages' weights sharded over tensor by the tp rule table (heads,
    mlp, vocab; the layer axis over pipeline), activations constrained inside each stage."""
    from sciscale_jax import parallel

    cfg = TransformerConfig(vocab_size=24, num_layers=4, num_heads=2, embed_dim=16, mlp_dim=24, max_len=SEQ,
                            scan_layers=True, sharding="tp")
    model = Transformer(cfg, rngs=nnx.Rngs(0))
    axes = parallel.param_axes(model)
    graphdef, params, rest = split_model(model)
    _, batch = make(1, 8)
    mesh = make_mesh(ParallelConfig(pipeline=2, tensor=2), jax.devices()[:4])
    placed = jax.device_put(params, parallel.tree_shardings(params, axes, parallel.rules_for("tp"), mesh))
    wi = placed["layers"]["mlp"]["wi"]["kernel"]
    assert wi.sharding.spec == jax.sharding.PartitionSpec("pipeline", None, "tensor")
    grad_fn = pipeline_grad_fn(graphdef, mesh=mesh, embed_fn=embed_fn, block_args_fn=block_args_fn, head_fn=head_fn,
                               count_fn=count_fn, schedule="1f1b", microbatches=2)
    with jax.set_mesh(mesh):
        loss, _, grads = jax.jit(grad_fn)(placed, rest, batch, None)
    _assert_matches_one_device(cfg, batch, loss, grads)


def _assert_matches_one_device(cfg, batch, loss, grads):
    """The MLM loss and gradients of ``cfg``'s model (seed 0, no sharding) on one device, 1e-5 relative."""
    ref_graphdef, ref_params, ref_rest = split_model(Transformer(dataclasses.replace(cfg, sharding=None),
                                                                 rngs=nnx.Rngs(0)))
    ref_loss, _, ref_grads = jax.jit(backprop_grad_fn(ref_graphdef, mlm_loss))(ref_params, ref_rest, batch, None)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
    for g, r in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads), strict=True):
        np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-5 * float(jnp.max(jnp.abs(r))))


def _recipe_stages_match(recipe_name, loss_fn, **model_kw):
    """The recipe's pipeline stages on 2 stages (1F1B, 3 microbatches): loss, count and gradients equal
    the single-device step's under ``loss_fn``."""
    from sciscale_jax.recipes import get_recipe

    (graphdef, params, rest), batch = make(3, 6, **model_kw)
    mesh = make_mesh(ParallelConfig(pipeline=2), jax.devices()[:2])
    grad_fn = get_recipe(recipe_name).pipeline.grad_fn(graphdef, mesh=mesh, schedule="1f1b", microbatches=3)
    loss, (count, _), grads = jax.jit(grad_fn)(params, rest, batch, None)
    ref_loss, (ref_count, _), ref_grads = jax.jit(backprop_grad_fn(graphdef, loss_fn))(params, rest, batch, None)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
    np.testing.assert_allclose(count, ref_count)
    for g, r in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads), strict=True):
        np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-5 * float(jnp.max(jnp.abs(r))))
    return batch


def test_recipe_stages_causal_lm_matches_single_device():
    """smiles-lm's stages (recipes.transformer_stages.CAUSAL_LM): next-token loss and gradients."""
    from sciscale_jax.losses import causal_lm_loss

    _recipe_stages_match("smiles-lm", causal_lm_loss)


def test_recipe_stages_with_esm2_layers_match_single_device():
    """protein-mlm's stages (recipes.transformer_stages.MLM) on ESM-2's layers: LayerNorm, biases,
    erf GELU, the tied LM head and token dropout of the mask token (id 1, drawn in the inputs)."""
    esm2 = dict(norm="layer", bias=True, mlp="gelu_exact", head="esm", token_dropout_id=1)
    batch = _recipe_stages_match("protein-mlm", mlm_loss, **esm2)
    assert int(jnp.sum(batch["inputs"] == 1)) > 0


def _shard_bytes(tree, shardings):
    """Bytes one device holds of ``tree`` (arrays or shapes) under ``shardings``."""
    return sum(int(np.prod(s.shard_shape(x.shape))) * x.dtype.itemsize
               for x, s in zip(jax.tree.leaves(tree), jax.tree.leaves(shardings), strict=True))


def test_transformer_fsdp_inside_stages_matches_single_device_and_shards_parameters():
    """pipeline=2 x data=2 x fsdp=2 under the fsdp rule table, 5 layers over 2 stages (3 + 2, the layer
    axis replicated): each stage holds its parameters split over fsdp (gathered at each use inside
    the stage); the loss and gradients equal the one-device run, and the per-device bytes of the
    parameters and of the returned gradients are about half those of parameters replicated over
    fsdp (the dp rule table on the same mesh)."""
    from sciscale_jax import parallel
    from sciscale_jax.parallel.axes import LAYERS

    cfg = TransformerConfig(vocab_size=VOCAB, num_layers=5, num_heads=2, embed_dim=16, mlp_dim=24, max_len=SEQ,
                            scan_layers=True, sharding="fsdp")
    model = Transformer(cfg, rngs=nnx.Rngs(0))
    axes = parallel.param_axes(model)
    graphdef, params, rest = split_model(model)
    _, batch = make(1, 12)  # 3 microbatches of 4 rows, one per data x fsdp shard
    mesh = make_mesh(ParallelConfig(pipeline=2, data=2, fsdp=2), jax.devices()[:8])
    shardings = parallel.tree_shardings(params, axes, parallel.rules_for("fsdp", {LAYERS: None}), mesh)
    placed = jax.device_put(params, shardings)
    assert placed["layers"]["mlp"]["wi"]["kernel"].sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", None)
    grad_fn = pipeline_grad_fn(graphdef, mesh=mesh, embed_fn=embed_fn, block_args_fn=block_args_fn, head_fn=head_fn,
                               count_fn=count_fn, schedule="1f1b", microbatches=3, param_shardings=shardings)
    with jax.set_mesh(mesh):
        compiled = jax.jit(grad_fn).lower(placed, rest, batch, None).compile()
        loss, _, grads = compiled(placed, rest, batch, None)
    _assert_matches_one_device(cfg, batch, loss, grads)
    # per-device bytes: the placed parameters and the compiled function's gradient outputs against
    # the same trees replicated over fsdp
    replicated = parallel.tree_shardings(params, axes, parallel.rules_for("dp", {LAYERS: None}), mesh)
    full = _shard_bytes(params, replicated)
    assert _shard_bytes(params, shardings) <= 0.55 * full
    assert _shard_bytes(grads, compiled.output_shardings[2]) <= 0.55 * full


def test_fp16_loss_scaling_pipelined_step_matches_unpipelined():
    """fp16 compute with dynamic loss scaling: the pipelined train step seeds its backward with the
    scaled loss as the unpipelined step does, so (1) at a moderate scale both take the same step
    (parameters, scale and the skip counter), (2) at a scale that overflows float16 cotangents both
    skip it: parameters unchanged, the scale halved, one skipped step."""
    import optax

    from sciscale_jax import precision
    from sciscale_jax.train.step import init_train_state, make_train_step

    cfg = TransformerConfig(vocab_size=VOCAB, num_layers=2, num_heads=2, embed_dim=16, mlp_dim=24, max_len=SEQ,
                            scan_layers=True, precision="fp16")
    model = Transformer(cfg, rngs=nnx.Rngs(0))
    assert jnp.dtype(model.config.dtype) == jnp.float16
    _, batch = make(1, 4)
    mesh = make_mesh(ParallelConfig(pipeline=2), jax.devices()[:2])
    tx = precision.dynamic_loss_scaling(optax.sgd(0.5), initial_scale=2.0**10)
    graphdef, state0 = init_train_state(model, tx)
    piped = pipeline_grad_fn(graphdef, mesh=mesh, embed_fn=embed_fn, block_args_fn=block_args_fn,
                             head_fn=head_fn, count_fn=count_fn, schedule="1f1b", microbatches=2)
    steps = {name: jax.jit(make_train_step(graphdef, tx, loss_fn=mlm_loss, grad_fn=grad_fn, loss_scaling=True))
             for name, grad_fn in (("pipeline", piped), ("plain", None))}
    for scale, skipped in ((2.0**10, 0), (2.0**30, 1)):  # 2^30 / tokens overflows float16 (max 65504)
        opt = state0.opt_state
        state = state0._replace(opt_state=opt._replace(loss_scale=opt.loss_scale._replace(
            loss_scale=jnp.asarray(scale, jnp.float32))))
        out = {name: step(state, batch) for name, step in steps.items()}
        for name in out:
            new, metrics = out[name]
            assert int(metrics["skipped_steps"]) == skipped, name
            assert float(metrics["loss_scale"]) == (scale / 2 if skipped else scale), name
        (new, metrics), (ref, ref_metrics) = out["pipeline"], out["plain"]
        np.testing.assert_allclose(metrics["loss"], ref_metrics["loss"], rtol=2e-3)
        for x, y, p0 in zip(jax.tree.leaves(new.params), jax.tree.leaves(ref.params), jax.tree.leaves(state.params),
                            strict=True):
            if skipped:
                np.testing.assert_array_equal(x, p0)
            else:  # the update, to float16 accuracy
                d, dr = np.asarray(x - p0, np.float64), np.asarray(y - p0, np.float64)
                assert np.linalg.norm(d - dr) <= 2e-2 * np.linalg.norm(dr) + 1e-7
        if not skipped:
            assert max(float(jnp.max(jnp.abs(x - p0))) for x, p0 in
                       zip(jax.tree.leaves(new.params), jax.tree.leaves(state.params))) > 1e-3


def test_pipelined_dropout_follows_the_step_key():
    """With a step key the pipelined Transformer draws dropout: the same key gives the same loss and
    gradients, another key another loss (one compiled function; the Evoformer's version of this
    test is in the slow set)."""
    from sciscale_jax.recipes import get_recipe

    cfg = TransformerConfig(vocab_size=VOCAB, num_layers=2, num_heads=2, embed_dim=16, mlp_dim=24, max_len=SEQ,
                            scan_layers=True, dropout=0.2)
    graphdef, params, rest = split_model(Transformer(cfg, rngs=nnx.Rngs(0)))
    _, batch = make(2, 4)
    mesh = make_mesh(ParallelConfig(pipeline=2), jax.devices()[:2])
    grad_fn = jax.jit(get_recipe("protein-mlm").pipeline.grad_fn(graphdef, mesh=mesh, schedule="1f1b", microbatches=2))
    a = grad_fn(params, rest, batch, jax.random.key(3))
    b = grad_fn(params, rest, batch, jax.random.key(3))
    c = grad_fn(params, rest, batch, jax.random.key(4))
    assert float(a[0]) == float(b[0]) and abs(float(a[0]) - float(c[0])) > 1e-6
    for x, y in zip(jax.tree.leaves(a[2]), jax.tree.leaves(b[2]), strict=True):
        np.testing.assert_array_equal(x, y)
