"""AlphaFold's recycling (``EvoformerConfig.num_recycle``, ``Evoformer.__call__``).

The reference is a transcription of AlphaFold's ``AlphaFold``/``EmbeddingsAndEvoformer`` loop
(modules.py) written here from the model's sub-modules: every pass embeds the features, adds
the layer norms (written out: mean, variance, epsilon 1e-5, scale, offset) of the previous pass's
first MSA row and pair, and ``prev_pos_linear`` of the distogram of the previous positions (zero
without a structure module), runs the extra-MSA and Evoformer stacks; the first pass starts from
zeros. The gradient is the last pass's alone, the earlier passes' outputs constants
(AlphaFold's ``stop_gradient``), checked against the transcription's and shown to differ from
the gradient through every pass.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sciscale_jax.models.evoformer import Evoformer, recycle_count
from sciscale_jax.parallel import ParallelConfig, make_mesh
from test_evoformer import perturb, small_config
from test_evoformer_params import _inputs

CFG = small_config(num_blocks=1, num_extra_blocks=1, num_recycle=2)


def _model(cfg=CFG):
    return perturb(Evoformer(cfg, rngs=nnx.Rngs(0)), 1)


def _ln(x, norm):
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / jnp.sqrt(var + 1e-5) * norm.scale[...] + norm.offset[...]


def _reference(model, passes: int, stop: bool = True):
    """(msa, pair) after ``passes`` recycled passes and the last one, transcribed."""
    args, kwargs = _inputs()
    seq_mask = args[4]
    pair_mask = seq_mask[:, :, None] * seq_mask[:, None, :]
    b, r = args[0].shape[:2]
    prev_m1, prev_z = jnp.zeros((b, r, CFG.c_m)), jnp.zeros((b, r, r, CFG.c_z))
    pos = model.prev_pos_linear.bias[...]  # distogram of zero positions: no bin holds 0, only the bias
    for i in range(passes + 1):
        m, z = model.embedder(*args[:3])
        z = z + pos + _ln(prev_z, model.prev_pair_norm)
        m = m.at[:, 0].add(_ln(prev_m1, model.prev_msa_first_row_norm))
        e = model.extra_msa_activations(kwargs["extra_msa_feat"])
        _, z = model.extra_msa_stack(e, z, kwargs["extra_msa_mask"], pair_mask)
        m, z = model.evoformer_stack(m, z, args[3], pair_mask)
        prev_m1, prev_z = m[:, 0], z
        if stop:
            prev_m1, prev_z = jax.lax.stop_gradient(prev_m1), jax.lax.stop_gradient(prev_z)
    return m, z


def test_recycled_passes_feed_the_first_msa_row_and_pair_to_the_next_embedder():
    model = _model()
    args, kwargs = _inputs()
    outs = {}
    for n in (0, 1, 2):
        got = model(*args, **kwargs, num_iter=n)
        m, z = _reference(model, n)
        np.testing.assert_allclose(np.asarray(got["msa"]), np.asarray(m), rtol=2e-5, atol=2e-5)
        np.testing.assert_allclose(np.asarray(got["pair"]), np.asarray(z), rtol=2e-5, atol=2e-5)
        outs[n] = np.asarray(got["pair"])
    assert np.abs(outs[1] - outs[0]).max() > 1e-3 and np.abs(outs[2] - outs[1]).max() > 1e-3  # passes matter
    evaluated = model(*args, **kwargs)  # no key: evaluation runs num_recycle passes
    np.testing.assert_array_equal(np.asarray(evaluated["pair"]), outs[2])
    # A traced count (training draws it) runs the same passes.
    traced = nnx.jit(lambda mdl, n: mdl(*args, **kwargs, num_iter=n)["pair"])(model, jnp.int32(1))
    np.testing.assert_allclose(np.asarray(traced), outs[1], rtol=2e-5, atol=2e-5)


def test_recycling_without_passes_is_the_first_pass_of_alphafolds_embedder():
    args, kwargs = _inputs()
    recycled = _model()
    first = Evoformer(dataclasses.replace(CFG, num_recycle=0, recycle_first_pass=True), rngs=nnx.Rngs(0))
    nnx.update(first, nnx.state(recycled, nnx.Param))
    np.testing.assert_array_equal(np.asarray(recycled(*args, **kwargs, num_iter=0)["pair"]),
                                  np.asarray(first(*args, **kwargs)["pair"]))
    with pytest.raises(ValueError, match="num_iter=1 needs num_recycle > 0"):
        first(*args, **kwargs, num_iter=1)
    with pytest.raises(ValueError, match="num_recycle=-1 must be a non-negative integer"):
        small_config(num_recycle=-1)


def test_the_gradient_is_the_last_passs_with_the_earlier_passes_constant():
    model = _model()
    graphdef, state = nnx.split(model)
    args, kwargs = _inputs()
    w = np.random.default_rng(5).normal(size=(1, 7, 7, CFG.c_z)).astype(np.float32)

    def loss(state, n):
        out = nnx.merge(graphdef, state)(*args, **kwargs, num_iter=n)
        return jnp.sum(jnp.sin(out["pair"]) * w) + jnp.sum(out["msa"] ** 2)

    def reference(state, stop):
        m, z = _reference(nnx.merge(graphdef, state), 2, stop)
        return jnp.sum(jnp.sin(z) * w) + jnp.sum(m ** 2)

    got = jax.jit(jax.grad(loss))(state, jnp.int32(2))  # a traced count: a while_loop, never differentiated
    want = jax.jit(jax.grad(reference), static_argnums=1)(state, True)
    through = jax.jit(jax.grad(reference), static_argnums=1)(state, False)
    flat = lambda t: np.concatenate([np.ravel(x) for x in jax.tree.leaves(t)])  # noqa: E731
    got, want, through = flat(got), flat(want), flat(through)
    scale = np.abs(want).max()
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5 * scale)
    assert np.abs(through - want).max() > 100 * 1e-5 * scale  # the gradient through every pass differs


def test_training_draws_the_count_uniformly_from_the_step_key():
    keys = jax.random.split(jax.random.key(3), 400)
    counts = np.bincount(np.asarray(jax.vmap(lambda k: recycle_count(k, 3))(keys)), minlength=4)
    assert counts.shape == (4,) and counts.min() > 60, counts  # 100 each expected; 60 is 4 sd below
    model = _model(dataclasses.replace(CFG, msa_dropout=0.0, pair_dropout=0.0))
    args, kwargs = _inputs()
    key = keys[0]
    n = int(recycle_count(key, CFG.num_recycle))
    other = (n + 1) % (CFG.num_recycle + 1)
    drawn = np.asarray(model(*args, **kwargs, key=key)["pair"])
    np.testing.assert_allclose(drawn, np.asarray(model(*args, **kwargs, key=key, num_iter=n)["pair"]), rtol=1e-6,
                               atol=1e-6)
    assert np.abs(drawn - np.asarray(model(*args, **kwargs, key=key, num_iter=other)["pair"])).max() > 1e-3


def test_the_planners_flop_count_takes_the_mean_of_the_drawn_passes():
    """A drawn count (a ``while_loop``) is counted as its mean, N / 2 passes: the average of the
    FLOPs of the fixed counts 0..N, each a ``fori_loop`` of known length (a ``scan``)."""
    from sciscale_jax.memory.estimate import expected_trips, matmul_flops

    args, kwargs = _inputs()
    key = jax.random.key(0)
    for n in (1, 3):
        model = _model(dataclasses.replace(CFG, num_recycle=n))
        flops = lambda **kw: matmul_flops(jax.make_jaxpr(  # noqa: E731
            lambda: model(*args, **kwargs, key=key, **kw)["pair"])())
        fixed = [flops(num_iter=i) for i in range(n + 1)]
        assert fixed[1] > fixed[0] * 1.5  # a pass is most of the FLOPs
        assert flops() == pytest.approx(sum(fixed) / len(fixed), rel=1e-12)
    # the scope alone: a while_loop's body counted as often as it says
    body = lambda i, c: c @ c  # noqa: E731
    loop = lambda x, k: jax.lax.fori_loop(0, k, body, x)  # noqa: E731
    one = matmul_flops(jax.make_jaxpr(loop)(jnp.ones((4, 4)), 3))
    assert one == 2 * 4 * 4 * 4

    def scoped(x, k):
        with expected_trips(2.5):
            return loop(x, k)
    assert matmul_flops(jax.make_jaxpr(scoped)(jnp.ones((4, 4)), 3)) == 2.5 * one
    with pytest.raises(ValueError, match="expected trips -1 must be a finite number >= 0"):
        expected_trips(-1)


def test_recycling_on_a_dap_mesh_equals_one_device():
    model = _model()
    graphdef, state = nnx.split(model)
    args, kwargs = _inputs()

    def run(state, n):
        out = nnx.merge(graphdef, state)(*args, **kwargs, num_iter=n)
        return out["msa"], out["pair"]
    one = jax.device_get(jax.jit(run)(state, jnp.int32(2)))
    with jax.set_mesh(make_mesh(ParallelConfig(dap=2))):
        sharded = jax.device_get(jax.jit(run)(state, jnp.int32(2)))
    for a, b in zip(sharded, one):
        np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-5)


def test_msa_evoformer_trains_with_recycling_and_refuses_it_on_a_pipeline(tmp_path):
    from sciscale_jax.recipes import get_recipe, load_run
    from sciscale_jax.train import TrainConfig
    from test_msa_evoformer import ONE_BLOCK, _leaves, _run

    result = _run(tmp_path, "recycled", steps=2, model=dict(ONE_BLOCK, num_recycle=2))
    assert np.isfinite(result["val_loss"]) and np.isfinite(result["train_loss"])
    assert all(np.isfinite(x).all() for x in _leaves(result))
    assert load_run(tmp_path / "recycled", log=lambda *_: None).model_config.num_recycle == 2  # recorded
    recipe = get_recipe("msa-evoformer")
    with pytest.raises(ValueError, match="num_recycle=2: recycling feeds the last stage's outputs back"):
        recipe.check(recipe.make_config(num_recycle=2), TrainConfig(mesh="pipeline=2"), None)
