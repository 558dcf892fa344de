"""ZeRO stages on the real train step: the loop's state, placement and jit, compiled on 8 devices.

The step is built as ``sciscale_jax.train`` builds it (``init_train_state``, ``plan_placement``,
``make_train_step`` with the placement's gradient shardings, jit with in/out shardings) for a
small Transformer with AdamW. Per-device bytes come from the compiled memory analysis and from
the shapes in the compiled HLO; the expected sizes come from counting the parameters here.
Last, each Transformer recipe's own loop step at ZeRO-3 against its ZeRO-0 step.
"""

import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from sciscale_jax import optim, parallel
from sciscale_jax.models.transformer import Transformer, TransformerConfig
from sciscale_jax.train.sharding import compile_train_step, plan_placement, resolve_strategy
from sciscale_jax.train.step import init_train_state, make_train_step

N = 8
CFG = TransformerConfig(vocab_size=40, num_layers=2, num_heads=4, embed_dim=64, mlp_dim=192, max_len=16, causal=True)
BYTES = {"f64": 8, "f32": 4, "s32": 4, "u32": 4, "bf16": 2, "f16": 2, "pred": 1, "s8": 1, "u8": 1}


def causal_loss(model, batch, key):
    """(sum, count) of next-token cross entropies over real tokens."""
    tokens, real = batch["inputs"], batch["mask"]
    logits = model(tokens, mask_bs=real, dropout_key=key)[:, :-1].astype(jnp.float32)
    nll = optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:])
    w = (real[:, 1:] & real[:, :-1]).astype(jnp.float32)
    return jnp.sum(nll * w), jnp.sum(w)


def _batch(seed=0, size=16):
    rng = np.random.default_rng(seed)
    mask = np.ones((size, CFG.max_len), bool)
    for i, n in enumerate(rng.integers(5, CFG.max_len + 1, size)):  # uneven real lengths per device
        mask[i, n:] = False
    return {"inputs": jnp.asarray(rng.integers(0, CFG.vocab_size, (size, CFG.max_len)), jnp.int32),
            "mask": jnp.asarray(mask)}


def _setup(mesh_spec, zero, tx=None):
    cfg = dataclasses.replace(CFG, sharding=resolve_strategy(mesh_spec))  # as the loop builds the model
    model = Transformer(cfg, rngs=nnx.Rngs(0))
    tx = tx or optax.adamw(1e-2)
    axes = parallel.param_axes(model)
    graphdef, state = init_train_state(model, tx)
    place = plan_placement(mesh_spec, cfg.sharding, zero, state, axes, tx, _batch(), model_sharding=cfg.sharding)
    step = make_train_step(graphdef, tx, loss_fn=causal_loss, **place.step_kwargs())
    return graphdef, tx, state, place, step


def collective_bytes(hlo: str, op: str) -> int:
    """Per-device bytes of the results of every ``op`` in compiled HLO (tuple results summed)."""
    total = 0
    for line in hlo.splitlines():
        m = re.match(rf"\s*(?:ROOT )?%\S+ = (.*?) {op}(?:-start)?\(", line)
        if m:
            for dtype, dims in re.findall(r"(\w+)\[([\d,]*)\]", m.group(1)):
                total += BYTES[dtype] * int(np.prod([int(d) for d in dims.split(",") if d]))
    return total


def tree_bytes(tree) -> int:
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))


@pytest.mark.parametrize("name,mesh_spec,zero", [("adafactor", "fsdp=8", 0), ("adafactor", "data=2,fsdp=4", 1),
                                                  ("sm3", "fsdp=4,tensor=2", 0), ("adam_mini", "fsdp=4,tensor=2", 1)])
def test_optimizer_state_shaped_unlike_its_parameter_is_placed_where_it_divides(name, mesh_spec, zero):
    """Optimizer state of other shapes than its parameter: Adafactor's factored moments and the
    (1,)-shaped placeholders it keeps beside a vector's full moment, Adam-mini's block-reduced
    second moments, SM3's per-axis accumulators (not a tree shaped like the parameters). The
    placeholders and Adam-mini's moments used to take their parameter's sharding and every such
    FSDP/TP run failed at initialisation (IndivisibleError); SM3 failed on any mesh. Each
    sharding must split its leaf; a moment shaped like its parameter keeps the parameter's
    layout; the jitted init with these shardings computes the optimizer's own init."""
    tx = optim.get_optimizer(name, 1e-3)
    _, _, state, place, _ = _setup(mesh_spec, zero, tx)
    shapes = jax.eval_shape(tx.init, state.params)
    for x, s in zip(jax.tree.leaves(shapes), jax.tree.leaves(place.state.opt_state), strict=True):
        s.shard_shape(x.shape)  # raises where the sharding does not split the leaf
    norm = ("layers", 0, "mlp_norm", "scale")
    assert not place.state.params["layers"][0]["mlp_norm"]["scale"].is_fully_replicated
    paths = [tuple(getattr(k, "key", getattr(k, "idx", getattr(k, "name", None))) for k in path)
             for path, _ in jax.tree_util.tree_leaves_with_path(shapes)]
    like_norm = [s for p, x, s in zip(paths, jax.tree.leaves(shapes), jax.tree.leaves(place.state.opt_state))
                 if p[-len(norm):] == norm and x.shape == (CFG.embed_dim,)]
    assert like_norm and all(not s.is_fully_replicated for s in like_norm)
    with jax.set_mesh(place.mesh):
        opt_state = jax.jit(tx.init, out_shardings=place.state.opt_state)(state.params)
    for a, b in zip(jax.tree.leaves(opt_state), jax.tree.leaves(tx.init(state.params)), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_zero3_splits_8bit_adams_codes_and_block_maxima():
    """8-bit Adam keeps each moment as a (codes, absmax) pair, not a tree shaped like the
    parameters; under ZeRO-3 on fsdp=8 both used to stay whole on every device (the state of a
    model's largest arrays, 8x what ZeRO-3 should leave). Every large array's codes and maxima
    must be split 8 ways now, and the sharded init equal the optimizer's own."""
    from sciscale_jax.optim.adamw_8bit import Quantized

    tx = optim.get_optimizer("adamw_8bit", 1e-3)
    _, _, state, place, _ = _setup("fsdp=8", 3, tx)
    quantized = [q for q in jax.tree.leaves(place.state.opt_state.mu, is_leaf=lambda x: isinstance(x, Quantized))
                 if isinstance(q, Quantized)]
    shapes = [q for q in jax.tree.leaves(jax.eval_shape(tx.init, state.params).mu,
                                         is_leaf=lambda x: isinstance(x, Quantized)) if isinstance(q, Quantized)]
    assert quantized and len(quantized) == len(shapes)
    for q, shape in zip(quantized, shapes):
        for sharding, x in ((q.codes, shape.codes), (q.absmax, shape.absmax)):
            assert np.prod(sharding.shard_shape(x.shape)) * 8 == np.prod(x.shape), (x.shape, sharding)
    with jax.set_mesh(place.mesh):
        opt_state = jax.jit(tx.init, out_shardings=place.state.opt_state)(state.params)
    for a, b in zip(jax.tree.leaves(opt_state), jax.tree.leaves(tx.init(state.params)), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def _data8():
    """{stage: (memory analysis, HLO text, reduce_scatter flag)} for the step on mesh data=8."""
    out = {}
    for zero in (0, 1, 2, 3):
        _, _, state, place, step = _setup("data=8", zero)
        compiled = compile_train_step(step, place, state, _batch())
        out[zero] = (compiled.memory_analysis(), compiled.as_text(), place.reduce_scatter)
    return out


def test_zero_stages_on_data8():
    """The four compiled stages on mesh data=8, checked in one test so that they compile once in
    the suite (a module fixture is built again on each pytest-xdist worker that runs a user)."""
    data8 = _data8()
    _state_shrinks_by_n(data8)
    _zero2_reduce_scatters_gradients_to_one_nth(data8)
    _zero2_temporaries_not_above_zero1(data8)


def _state_shrinks_by_n(data8):
    """Arguments of the compiled loop step: stage 1 drops (1 - 1/N) of the AdamW moments,
    stage 3 also (1 - 1/N) of the parameters (sizes counted from the model, not the rule)."""
    _, _, state, _, _ = _setup("data=8", 0)
    p = tree_bytes(state.params)
    moments = 2 * p  # AdamW: mu and nu, shaped like the parameters
    args = {z: data8[z][0].argument_size_in_bytes for z in data8}
    assert args[0] - args[1] == pytest.approx(moments * (1 - 1 / N), rel=0.02), args
    assert args[2] == args[1], args                      # stage 2 shards nothing that persists
    assert args[1] - args[3] == pytest.approx(p * (1 - 1 / N), rel=0.02), args
    assert args[3] == pytest.approx((p + moments) / N + tree_bytes(_batch()), rel=0.03), args


def _zero2_reduce_scatters_gradients_to_one_nth(data8):
    """Stage 2 on a data-parallel mesh: the gradients reach the optimizer through reduce-scatters
    whose results hold 1/N of the parameter bytes; stages 0 and 1 all-reduce the full gradients."""
    _, _, state, _, _ = _setup("data=8", 0)
    p = tree_bytes(state.params)
    for zero in (0, 1):
        _, hlo, rs = data8[zero]
        assert not rs and "reduce-scatter" not in hlo
        assert collective_bytes(hlo, "all-reduce") == pytest.approx(p, rel=0.02)
    _, hlo, rs = data8[2]
    assert rs
    assert collective_bytes(hlo, "reduce-scatter") == pytest.approx(p / N, rel=0.02)
    assert collective_bytes(hlo, "all-reduce") < 0.01 * p  # only the loss and token counts


def _zero2_temporaries_not_above_zero1(data8):
    temp = {z: data8[z][0].temp_size_in_bytes for z in data8}
    assert temp[2] <= temp[1], temp


@pytest.mark.parametrize("zero", [2, pytest.param(3, marks=pytest.mark.slow)])
def test_sharded_gradient_steps_match_one_device(zero):
    """Two SGD steps of the compiled ZeRO step (psum_scatter path at stage 2) give the parameters
    and losses of the same steps on one device, with uneven token counts across devices. (SGD:
    parameter differences are lr times gradient differences; Adam would amplify float32
    summation-order noise in near-zero gradients to a full step.)"""
    graphdef, tx, state, place, step = _setup("data=8", zero, optax.sgd(0.5))
    single = jax.jit(make_train_step(graphdef, tx, loss_fn=causal_loss))
    compiled = compile_train_step(step, place, state, _batch(), donate=False)
    sharded_state = jax.device_put(state, place.state)
    for seed in (1, 2):
        batch = _batch(seed)
        state, m_ref = single(state, batch)
        sharded_state, m = compiled(sharded_state, jax.device_put(batch, place.batch))
        np.testing.assert_allclose(float(m["loss"]), float(m_ref["loss"]), rtol=1e-5)
        np.testing.assert_allclose(float(m["tokens"]), float(m_ref["tokens"]))
        np.testing.assert_allclose(float(m["grad_norm"]), float(m_ref["grad_norm"]), rtol=1e-4)
    for a, b in zip(jax.tree.leaves(sharded_state.params), jax.tree.leaves(state.params)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=2e-6)


@pytest.mark.slow
@pytest.mark.parametrize("mesh_spec", ["data=4,fsdp=2", "data=2,fsdp=2,tensor=2"])
def test_zero_stages_on_mixed_meshes(mesh_spec):
    """On meshes with fsdp/tensor axes, from the compiled step's arguments: stage 1 splits the AdamW
    moments as stage 3 splits the parameters (moment bytes dropped = 2x parameter bytes dropped),
    stage 2 adds nothing persistent, and on data x fsdp stage 3 holds 1/N of all model state."""
    args = {}
    for zero in (0, 1, 2, 3):
        _, _, state, place, step = _setup(mesh_spec, zero)
        args[zero] = compile_train_step(step, place, state, _batch()).memory_analysis().argument_size_in_bytes
        assert not place.reduce_scatter  # GSPMD path: the constraint shards the gradients
    assert args[0] > args[1] == args[2] > args[3], args
    assert args[0] - args[1] == pytest.approx(2 * (args[1] - args[3]), rel=0.03), args
    if "tensor" not in mesh_spec:
        p = tree_bytes(state.params)
        assert args[3] == pytest.approx(3 * p / N + tree_bytes(_batch()) / N, rel=0.03), args


@pytest.mark.parametrize("recipe_name", ["protein-mlm", "smiles-lm", "weather-vit"])
def test_recipes_zero3_keeps_the_batch_split(recipe_name):
    """Each Transformer recipe's loop step (``train.abstract.abstract_run``) on mesh data=8: ZeRO-3
    holds no more temporaries than ZeRO-0 (it gathers weights, a few at a time, while the
    activations keep their batch split). A step whose compiler gathers activations over the batch
    instead exceeds it: the Evoformer's did by 3.1x (``test_msa_evoformer.py`` checks that one)."""
    from sciscale_jax.recipes import get_recipe
    from sciscale_jax.train import TrainConfig
    from sciscale_jax.train.abstract import abstract_run

    recipe = get_recipe(recipe_name)
    model_cfg = recipe.make_config(num_layers=2, embed_dim=64, num_heads=4, mlp_dim=128)
    temp = {}
    for zero in (0, 3):
        train_kw = {**recipe.train_defaults, "batch_size": 8, "mesh": "data=8", "zero": zero}
        if "seq_len" in recipe.train_defaults:
            train_kw["seq_len"] = 16
        compiled = abstract_run(recipe, model_cfg, TrainConfig(**train_kw)).compile()
        temp[zero] = compiled.memory_analysis().temp_size_in_bytes
    assert temp[3] <= 1.3 * temp[0], temp
