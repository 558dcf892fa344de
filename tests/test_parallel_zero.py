"""ZeRO stages: placement rule, the rule's per-device model state against the paper's formulas,
the reduce-scatter of the ZeRO-2 path in compiled HLO, and sharded checkpoints restored onto
smaller meshes. The loop's compiled train step per stage is measured in test_zero_train_step.py."""

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from sciscale_jax.parallel import (ParallelConfig, make_mesh, model_state_bytes, reduce_scatter_value_and_grad,
                                   rules_for, stage_sharding, train_shardings, tree_shardings, zero_spec)

from test_parallel_model import AXES, OPTIMIZER, init_params, loss_fn


def test_zero_spec_adds_data_axes_to_the_largest_divisible_dim():
    mesh = make_mesh(ParallelConfig(data=2, tensor=4))
    assert zero_spec(P(None, "tensor"), (16, 8), mesh) == P("data", "tensor")   # local 16 vs 2
    assert zero_spec(P(None, "tensor"), (2, 32), mesh) == P(None, ("tensor", "data"))  # local 2 vs 8
    assert zero_spec(P(), (3, 5), mesh) == P()  # nothing divides: stays replicated
    assert zero_spec(P("data"), (8,), mesh) == P("data")  # data already used
    s = NamedSharding(mesh, P(None, "tensor"))
    assert stage_sharding(s, (16, 8), 1, "params") is s and stage_sharding(s, (16, 8), 3, "params").spec[0] == "data"
    with pytest.raises(ValueError, match="zero stage must be one of"):
        stage_sharding(s, (16, 8), 4, "params")


# Ψ = 24576 + 8192 + 1024 parameters in a few odd-shaped but 8-divisible leaves.
SHAPES = {"w_in": (96, 256), "w_out": (64, 128), "scale": (1024,)}
PSI = sum(int(np.prod(s)) for s in SHAPES.values())


def _mixed_adam_step(p16, g16, master, mu, nu):
    """One mixed-precision Adam step: bf16 params/grads, fp32 master weights and moments.

    The bf16 params are not read here (the forward pass reads them), so the jit keeps them
    with keep_unused=True: they are resident model state all the same."""
    g = jax.tree.map(lambda x: x.astype(jnp.float32), g16)
    mu = jax.tree.map(lambda m, g: 0.9 * m + 0.1 * g, mu, g)
    nu = jax.tree.map(lambda v, g: 0.999 * v + 0.001 * g * g, nu, g)
    master = jax.tree.map(lambda w, m, v: w - 1e-3 * m / (jnp.sqrt(v) + 1e-8), master, mu, nu)
    return jax.tree.map(lambda w: w.astype(jnp.bfloat16), master), master, mu, nu


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_per_device_model_state_matches_the_zero_formula(stage):
    """The stage rule against the paper's table: the argument bytes of an update jitted with the
    rule's shardings are the formula. This checks the rule, not a train step (the shardings are
    the rule's own); tests/test_zero_train_step.py measures the loop's compiled step."""
    n = 8
    mesh = make_mesh(ParallelConfig(data=n))
    axes = {k: (None,) * len(s) for k, s in SHAPES.items()}
    f32 = {k: jax.ShapeDtypeStruct(s, jnp.float32) for k, s in SHAPES.items()}
    bf16 = {k: jax.ShapeDtypeStruct(s, jnp.bfloat16) for k, s in SHAPES.items()}
    model = tree_shardings(f32, axes, rules_for("dp"), mesh)
    sh = {kind: jax.tree.map(lambda s, x: stage_sharding(s, x.shape, stage, kind), model, f32)
          for kind in ("params", "grads", "opt_state")}
    in_sh = (sh["params"], sh["grads"], sh["opt_state"], sh["opt_state"], sh["opt_state"])
    compiled = jax.jit(_mixed_adam_step, in_shardings=in_sh, out_shardings=(in_sh[0], *in_sh[2:]),
                       donate_argnums=(0, 2, 3, 4), keep_unused=True).lower(bf16, bf16, f32, f32, f32).compile()
    measured = compiled.memory_analysis().argument_size_in_bytes
    formula = model_state_bytes(PSI, stage, n)
    assert abs(measured - formula) <= 0.10 * formula, (stage, measured, formula)
    if stage:  # each stage really saves memory against replication
        assert measured < 0.95 * model_state_bytes(PSI, stage - 1, n)


def test_zero2_path_reduce_scatters_and_matches_plain_gradients():
    mesh = make_mesh(ParallelConfig(data=8))
    rng = np.random.default_rng(5)
    params = {"w": jnp.asarray(rng.normal(size=(5, 16)), jnp.float32),   # split on dim 1
              "b": jnp.asarray(rng.normal(size=(3,)), jnp.float32)}      # 3 % 8: pmean-ed, replicated
    batch = (jnp.asarray(rng.normal(size=(16, 5)), jnp.float32), jnp.asarray(rng.normal(size=(16, 16)), jnp.float32))
    loss = lambda p, b: jnp.mean((jnp.tanh(b[0] @ p["w"]) * p["b"].sum() - b[1]) ** 2)
    sh = train_shardings(params, {"w": (None, None), "b": (None,)}, rules_for("dp"), mesh, 2)
    assert sh.grads["w"].spec == P(None, "data") and sh.grads["b"].is_fully_replicated
    compiled = jax.jit(reduce_scatter_value_and_grad(loss, mesh, sh.grads)).lower(params, batch).compile()
    assert "reduce-scatter" in compiled.as_text()
    value, grads = compiled(params, batch)
    ref_value, ref_grads = jax.jit(jax.value_and_grad(loss))(params, batch)
    np.testing.assert_allclose(value, ref_value, rtol=1e-5)   # sharded sums reorder
    for k in grads:
        assert grads[k].sharding.is_equivalent_to(sh.grads[k], grads[k].ndim)
        np.testing.assert_allclose(grads[k], ref_grads[k], rtol=1e-5, atol=1e-6, err_msg=k)


def test_zero2_path_rejects_model_parallel_meshes():
    mesh = make_mesh(ParallelConfig(data=4, tensor=2))
    with pytest.raises(ValueError, match=r"mesh also has \{'tensor': 2\}"):
        reduce_scatter_value_and_grad(loss_fn, mesh, {})


def test_checkpoint_saved_on_8_devices_restores_on_4_and_1(tmp_path):
    params = init_params()
    opt_state = OPTIMIZER.init(params)
    mesh8 = make_mesh(ParallelConfig(fsdp=4, tensor=2))
    sh8 = train_shardings(params, AXES, rules_for("fsdp_tp"), mesh8, 3, OPTIMIZER)
    state = {"params": jax.device_put(params, sh8.params), "opt": jax.device_put(opt_state, sh8.opt_state)}
    assert state["params"]["wq"].sharding.spec[0] == "fsdp"  # really split when saved
    with ocp.StandardCheckpointer() as ckpt:
        ckpt.save(tmp_path / "ckpt", state)
    expected = jax.device_get(state)
    for devices, config, strategy in ((jax.devices()[:4], ParallelConfig(tensor=4), "tp"),
                                      (jax.devices()[:1], ParallelConfig(), "dp")):
        mesh = make_mesh(config, devices)
        sh = train_shardings(params, AXES, rules_for(strategy), mesh, 0, OPTIMIZER)
        target = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                              {"params": params, "opt": opt_state}, {"params": sh.params, "opt": sh.opt_state})
        with ocp.StandardCheckpointer() as ckpt:
            restored = ckpt.restore(tmp_path / "ckpt", target)
        assert restored["params"]["wq"].sharding.mesh.size == len(devices)
        for got, want in zip(jax.tree.leaves(restored), jax.tree.leaves(expected)):
            np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
