"""The training loop on a device mesh equals the single-device run, and resumes across meshes."""

import jax
import numpy as np
import pytest

from sciscale_jax.models import TransformerConfig
from sciscale_jax.recipes import get_recipe
from sciscale_jax.train import TrainConfig, train

# One layer: every property here (placement, resharded resume, equality to one device) holds per layer,
# and each run is compile-bound.
MODEL = TransformerConfig(vocab_size=32, num_layers=1, num_heads=4, embed_dim=32, mlp_dim=64, max_len=64)


def _run(out, steps, **kw):
    cfg = TrainConfig(steps=steps, batch_size=8, seq_len=32, eval_every=1000, save_every=3, log_every=1,
                      warmup_steps=2, seed=1, schedule_steps=6, **kw)  # one schedule for the 3- and 6-step runs
    return train(get_recipe("protein-mlm"), MODEL, cfg, out, progress=False, log=lambda *_: None,
                 resume=(out / "checkpoints").exists())


def _close(a, b, rtol):
    jax.tree.map(lambda x, y: np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=1e-6), a, b)


def test_fsdp_tensor_zero3_matches_one_device_and_resumes_on_one_device(tmp_path):
    single = _run(tmp_path / "single", 6)
    sharded = _run(tmp_path / "mesh", 3, mesh="data=2,fsdp=2,tensor=2", zero=3)
    kernel = sharded["state"].params["layers"][0]["mlp"]["wi"]["kernel"]
    # embed over fsdp, mlp over tensor, and ZeRO-3 splits it further over the data axis
    assert kernel.sharding.spec == jax.sharding.PartitionSpec("fsdp", ("tensor", "data"))
    assert len(kernel.addressable_shards) == 8
    resumed = _run(tmp_path / "mesh", 6)  # same run, now on one device: restored from the 8-device checkpoint
    assert resumed["steps"] == 6
    _close(resumed["state"].params, single["state"].params, rtol=2e-4)
    assert resumed["val_loss"] == pytest.approx(single["val_loss"], rel=1e-4)


def test_bad_mesh_is_refused_before_anything_is_written(tmp_path):
    with pytest.raises(ValueError, match="has 6 devices but 8 devices are available"):
        _run(tmp_path / "bad", 2, mesh="data=2,tensor=3")
    assert not (tmp_path / "bad").exists()
    with pytest.raises(ValueError, match="zero=2 needs a mesh"):
        TrainConfig(zero=2)


def test_host_offload_keeps_state_on_host_trains_identically_and_resumes_onto_the_host(tmp_path):
    plain = _run(tmp_path / "plain", 6, mesh="data=8")
    offloaded = _run(tmp_path / "offload", 3, mesh="data=8", offload="opt_state,params")
    resumed = _run(tmp_path / "offload", 6, mesh="data=8", offload="opt_state,params")  # read onto the host
    for run in (offloaded, resumed):
        state = run["state"]
        kinds = {x.sharding.memory_kind for x in jax.tree.leaves((state.params, state.opt_state))}
        assert kinds == {"pinned_host"}
    assert {x.sharding.memory_kind for x in jax.tree.leaves(plain["state"].params)} == {"device"}
    assert resumed["steps"] == 6
    _close(resumed["state"].params, plain["state"].params, rtol=1e-5)
    assert resumed["val_loss"] == pytest.approx(plain["val_loss"], rel=1e-5)
    with pytest.raises(ValueError, match="unknown \\['gradients'\\]"):
        TrainConfig(offload="gradients")


def test_python_placement_refuses_a_model_built_without_its_rules():
    """plan_placement from Python: the model's activation rules must be the placement's (the
    CLI path sets them from the mesh); a mismatch is refused, a match gives the CLI's shardings."""
    import dataclasses

    import optax
    from flax import nnx

    from sciscale_jax import parallel
    from sciscale_jax.models import Transformer
    from sciscale_jax.train import init_train_state, plan_placement

    tx = optax.adamw(1e-3)
    batch = {"inputs": np.zeros((8, 32), np.int32)}
    model = Transformer(MODEL, rngs=nnx.Rngs(0))
    _, state = init_train_state(model, tx)
    with pytest.raises(ValueError, match=r"sharding=None but the parameters are placed with 'fsdp'"):
        plan_placement("data=4,fsdp=2", "fsdp", 0, state, parallel.param_axes(model), tx, batch,
                       model_sharding=MODEL.sharding)
    cfg = dataclasses.replace(MODEL, sharding="fsdp")
    place = plan_placement("data=4,fsdp=2", None, 0, state, parallel.param_axes(model), tx, batch,
                           model_sharding=cfg.sharding)  # None: the table the mesh picks, as the CLI does
    assert place.state.params["embed"].spec == jax.sharding.PartitionSpec(None, "fsdp")


def test_loop_zero2_reduce_scatters_gradients_and_matches_one_device(tmp_path):
    """`sciscale train --mesh data=8 --zero 2`: the loop's own compiled step reduce-scatters the
    gradients (1/N of each per device) and trains as one device does."""
    single = _run(tmp_path / "one", 3)
    zero2 = _run(tmp_path / "z2", 3, mesh="data=8", zero=2)
    hlo = zero2["compiled"].as_text()
    assert "reduce-scatter" in hlo
    _close(zero2["state"].params, single["state"].params, rtol=2e-4)


def test_evaluation_splits_like_the_training_batch():
    """On mesh data=8 with grad_accum=2 the loop evaluates each batch as pieces of batch/accum
    rows (scanned over in one call), each split over the data devices (1 row each here), as the
    train step takes its batch; the metrics equal a one-device evaluation of the whole batches,
    and the compiled evaluation holds a fraction of the temporaries of the same evaluation with
    the whole batch on every device (how the loop evaluated before pieces)."""
    import dataclasses

    import optax
    from flax import nnx

    from sciscale_jax import parallel
    from sciscale_jax.models import Transformer
    from sciscale_jax.train import init_train_state, plan_placement
    from sciscale_jax.train.loop import eval_batches, evaluate, over_pieces
    from sciscale_jax.train.step import make_eval_step

    recipe = get_recipe("protein-mlm")
    tc = TrainConfig(batch_size=16, seq_len=32, grad_accum=2, mesh="data=8")
    whole = recipe.build_data(tc).eval[:2]
    rows = len(next(iter(whole[0].values())))
    cfg = dataclasses.replace(MODEL, sharding="dp")
    model = Transformer(cfg, rngs=nnx.Rngs(0))
    tx = optax.adamw(1e-3)
    graphdef, state = init_train_state(model, tx)
    place = plan_placement("data=8", None, 0, state, parallel.param_axes(model), tx, whole[0],
                           model_sharding=cfg.sharding, batch_axes=recipe.axes_of)
    metrics = recipe.metrics_fn()
    plain_fn = make_eval_step(graphdef, lambda m, b, _k: metrics(m, b))
    eval_fn = jax.jit(over_pieces(plain_fn))
    batches = list(eval_batches(whole, place, recipe, tc.batch_size // tc.grad_accum))
    assert len(batches) == len(whole)
    for batch in batches:
        for x in batch.values():
            assert x.shape[:2] == (2 * rows // tc.batch_size, 8)
            assert x.sharding.shard_shape(x.shape)[:2] == (x.shape[0], 1)
    params = jax.device_put(state.params, place.state.params)
    with jax.set_mesh(place.mesh):
        split = evaluate(eval_fn, params, state.rest, batches)
        replicated = jax.device_put(whole[0], jax.sharding.NamedSharding(place.mesh, jax.sharding.PartitionSpec()))
        temp = {"piece": eval_fn.lower(params, state.rest, batches[0]).compile().memory_analysis().temp_size_in_bytes,
                "whole": jax.jit(plain_fn).lower(params, state.rest, replicated).compile().memory_analysis()
                .temp_size_in_bytes}
    one = evaluate(jax.jit(plain_fn), state.params, state.rest, whole)  # no mesh: every row on one device
    assert split.keys() == one.keys()
    for name in one:
        assert split[name] == pytest.approx(one[name], rel=1e-5), name
    assert temp["piece"] * 4 < temp["whole"], temp


def test_mesh_runs_initialise_straight_into_their_shards():
    """On a mesh the loop initialises the model and optimizer state with one jitted program whose
    outputs are the run's shardings (``train.loop.sharded_init``): with ZeRO-3 on data=8 each
    device's compiled output is about an eighth of the state and its temporaries are no larger,
    so the whole state is never on one device (before, it was built eagerly on device 0 and
    then split). The values are the eager initialisation's, up to float rounding."""
    import dataclasses

    from flax import nnx

    from sciscale_jax.train import init_train_state
    from sciscale_jax.train.abstract import abstract_run
    from sciscale_jax.train.loop import build_optimizer, init_program, sharded_init

    recipe = get_recipe("protein-mlm")
    tc = TrainConfig(batch_size=8, seq_len=16, mesh="data=8", zero=3, seed=3)
    run = abstract_run(recipe, dataclasses.replace(MODEL, embed_dim=64, mlp_dim=256, num_layers=2), tc)
    build = lambda: recipe.build_model(run.model_config, nnx.Rngs(tc.seed))  # noqa: E731  (as the loop builds it)
    tx = build_optimizer(tc)
    _, eager = init_train_state(build(), tx)
    state = sharded_init(build, tx, run.place.state)
    for x, want, sh in zip(jax.tree.leaves(state), jax.tree.leaves(eager), jax.tree.leaves(run.place.state),
                           strict=True):
        assert x.sharding == sh and x.shape == want.shape and x.dtype == want.dtype
        np.testing.assert_allclose(np.asarray(x), np.asarray(want), rtol=1e-6, atol=1e-7)
    whole = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(eager))
    memory = init_program(build, tx, run.place.state).lower().compile().memory_analysis()
    # measured: 203,772 output and 98,436 temporary bytes per device of 1,625,868 in all
    assert memory.output_size_in_bytes < 0.2 * whole, (memory.output_size_in_bytes, whole)
    assert memory.temp_size_in_bytes < 0.2 * whole, (memory.temp_size_in_bytes, whole)
