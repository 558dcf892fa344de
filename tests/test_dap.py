"""Dynamic Axial Parallelism (FastFold) for the Evoformer stack: on a mesh with a ``dap`` axis of
2, 4 and 8 (and data 2 x dap 4) the loss and gradients equal the one-device run, with dropout
on and the same key, at N_seq 5 and N_res 11 that no degree divides (padding inside); bad
meshes and attention implementations are refused before compilation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from sciscale_jax.models.evoformer import EvoformerStack
from sciscale_jax.parallel import ParallelConfig, make_mesh
from sciscale_jax.parallel import dap
from test_evoformer import make_inputs, small_config

_BASE = {}
# Compiling, not running, is nearly all of these tests' time on CPU: without LLVM's expensive passes
# it takes about half. Each comparison is between two programs compiled the same way.
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def _loss_grad_fn(graphdef, masks, key, linear=False):
    """jit(value_and_grad) of a loss of the stack's outputs: sum sin(m) m + cos(z) z, or with
    ``linear`` a fixed random linear form of m and z (smooth at bf16 resolution: z reaches ~10^3,
    where one bf16 ulp is several units and sin / cos of it are noise)."""
    msa_mask, pair_mask = masks
    rng = np.random.default_rng(11)
    m_shape, z_shape = make_inputs(seed=4)[0].shape, make_inputs(seed=4)[1].shape
    w_m, w_z = rng.normal(size=m_shape).astype(np.float32), rng.normal(size=z_shape).astype(np.float32)

    def loss(state, m, z):
        m_out, z_out = nnx.merge(graphdef, state)(m, z, msa_mask, pair_mask, key)
        m_out, z_out = m_out.astype(jnp.float32), z_out.astype(jnp.float32)  # bf16 compute: sum in float32
        if linear:
            return jnp.sum(w_m * m_out) + jnp.sum(w_z * z_out)
        return jnp.sum(jnp.sin(m_out) * m_out) + jnp.sum(jnp.cos(z_out) * z_out)
    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)), compiler_options=FAST_COMPILE)


def _base():
    """The 2-block stack's parameters (initialisation plus noise, so zero-initialised projections and
    unit gate biases matter), inputs, and its one-device loss and gradients; built once per module."""
    if not _BASE:
        graphdef, state = nnx.split(EvoformerStack(small_config(num_blocks=2), rngs=nnx.Rngs(0)))
        rng = np.random.default_rng(1)  # numpy noise: per-leaf jax.random ops would each compile
        state = jax.tree.map(lambda x: np.asarray(x) + rng.normal(scale=0.3, size=x.shape).astype(x.dtype), state)
        m, z, msa_mask, pair_mask, _ = make_inputs(seed=4)
        fn = _loss_grad_fn(graphdef, (msa_mask, pair_mask), jax.random.key(7))
        _BASE.update(fn=fn, args=(state, m, z), result=jax.device_get(fn(state, m, z)))
    return _BASE


# dap=2 and data=2 x dap=4 run fast in the composition test below, on the same comparison.
@pytest.mark.parametrize("mesh", [pytest.param("dap=2", marks=pytest.mark.slow), "dap=8",
                                  pytest.param("dap=4", marks=pytest.mark.slow),
                                  pytest.param("data=2,dap=4", marks=pytest.mark.slow)])
def test_dap_equals_one_device(mesh):
    base = _base()
    with jax.set_mesh(make_mesh(ParallelConfig.parse(mesh))):
        loss, grads = jax.device_get(base["fn"](*base["args"]))
    loss0, grads0 = base["result"]
    np.testing.assert_allclose(loss, loss0, rtol=1e-5)
    leaves, leaves0 = jax.tree.leaves(grads), jax.tree.leaves(grads0)
    scale = max(np.abs(g).max() for g in leaves0)
    for g, g0 in zip(leaves, leaves0, strict=True):  # LN offsets under a softmax have a zero gradient: atol
        np.testing.assert_allclose(g, g0, rtol=1e-4, atol=1e-5 * scale)


def _run(switches, mesh=None, linear=False):
    """Loss and gradients of the 2-block stack built with ``switches`` on the base parameters and
    inputs (the same key, dropout on), on one device or on ``mesh``."""
    base = _base()
    graphdef = nnx.graphdef(EvoformerStack(small_config(num_blocks=2, **switches), rngs=nnx.Rngs(0)))
    fn = _loss_grad_fn(graphdef, make_inputs(seed=4)[2:4], jax.random.key(7), linear)
    if mesh is None:
        return jax.device_get(fn(*base["args"]))
    with jax.set_mesh(make_mesh(ParallelConfig.parse(mesh))):
        return jax.device_get(fn(*base["args"]))


@pytest.mark.parametrize("mesh, switches", [
    # chunk 2 divides the local residues (12 / 2 = 6) and not the local sequences (6 / 2 = 3) or R = 11
    ("dap=2", dict(chunk_size=2, remat_modules=True, attention="chunked")),
    # chunk 2 does not divide the local residues (12 / 4 = 3); block remat without chunk remat
    ("data=2,dap=4", dict(chunk_size=2, remat="full", chunk_remat=False)),
])
def test_dap_composes_with_chunking_remat_and_chunked_attention(mesh, switches):
    """Chunking, sub-module and block remat and the chunked attention change only the schedule: under
    DAP they give the loss and gradients of the plain one-device run."""
    loss, grads = _run(switches, mesh)
    loss0, grads0 = _base()["result"]
    np.testing.assert_allclose(loss, loss0, rtol=1e-5)
    leaves, leaves0 = jax.tree.leaves(grads), jax.tree.leaves(grads0)
    scale = max(np.abs(g).max() for g in leaves0)
    for g, g0 in zip(leaves, leaves0, strict=True):
        np.testing.assert_allclose(g, g0, rtol=1e-4, atol=1e-5 * scale)


def _cos_rel(a, b):
    """Cosine and relative error norm of a against b (float64)."""
    a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
    return a @ b / (np.linalg.norm(a) * np.linalg.norm(b)), np.linalg.norm(a - b) / np.linalg.norm(b)


def test_dap_bf16_matches_one_device_bf16():
    """bf16 compute under data 2 x dap 4 against the one-device bf16 run (a linear loss of the
    outputs, smooth at bf16 resolution): the loss within 2e-2 relative, the gradients (all leaves as
    one vector, and each leaf holding > 1% of the largest leaf's norm) with cosine > 0.999 / 0.99 and
    relative error norm < 5e-2 / 1e-1 (measured: cosine 0.99988, 1.6e-2 / worst leaf 1.9e-2).
    The sharded program does compute in bf16."""
    loss1, grads1 = _run(dict(precision="bf16"), linear=True)
    loss, grads = _run(dict(precision="bf16"), "data=2,dap=4", linear=True)
    np.testing.assert_allclose(loss, loss1, rtol=2e-2)
    flat, flat1 = (np.concatenate([np.ravel(g) for g in jax.tree.leaves(t)]) for t in (grads, grads1))
    cos, rel = _cos_rel(flat, flat1)
    assert cos > 0.999 and rel < 5e-2, (cos, rel)
    big = max(np.linalg.norm(g) for g in jax.tree.leaves(grads1))
    for g, g1 in zip(jax.tree.leaves(grads), jax.tree.leaves(grads1), strict=True):
        if np.linalg.norm(g1) > 1e-2 * big:
            cos, rel = _cos_rel(g, g1)
            assert cos > 0.99 and rel < 1e-1, (g1.shape, cos, rel)
    stack = EvoformerStack(small_config(num_blocks=2, precision="bf16"), rngs=nnx.Rngs(0))
    m, z, msa_mask, pair_mask, _ = make_inputs(seed=4)
    with jax.set_mesh(make_mesh(ParallelConfig.parse("data=2,dap=4"))):
        jaxpr = str(jax.make_jaxpr(lambda m, z: stack(m, z, msa_mask, pair_mask, jax.random.key(7)))(m, z))
    assert "shard_map" in jaxpr and "bf16[" in jaxpr  # the sharded block computes in bf16


def test_chunked_attention_inside_shard_map():
    """DAP runs attention per device: the chunked implementation (scans, custom VJP) inside
    ``shard_map`` with q, k, v, mask split over ``dap`` and a bias every device holds whole gives the
    one-device XLA attention's output and gradients (the bias gradient summed over devices)."""
    from sciscale_jax.attention import chunked_attention, dot_product_attention
    rng = np.random.default_rng(3)
    q, k, v = (jnp.asarray(rng.normal(size=(4, 7, 2, 4)), jnp.float32) for _ in range(3))
    bias = jnp.asarray(rng.normal(size=(1, 2, 7, 7)), jnp.float32)
    mask = jnp.asarray(rng.random((4, 1, 1, 7)) > 0.3)

    def sharded(q, k, v, bias, mask):
        def local(q, k, v, bias, mask):
            return chunked_attention(q, k, v, bias=bias, mask=mask, q_chunk=3, kv_chunk=2)
        spec = P(dap.AXIS)
        return jax.shard_map(local, mesh=make_mesh(ParallelConfig(dap=2)), in_specs=(spec, spec, spec, P(), spec),
                             out_specs=spec)(q, k, v, bias, mask)

    def one(q, k, v, bias, mask):
        return dot_product_attention(q, k, v, bias=bias, mask=mask, impl="xla")

    def value_and_grads(fn):
        return jax.jit(jax.value_and_grad(lambda *a: jnp.sum(jnp.sin(fn(*a, mask))), argnums=(0, 1, 2, 3)))(
            q, k, v, bias)
    (loss, grads), (loss0, grads0) = value_and_grads(sharded), value_and_grads(one)
    np.testing.assert_allclose(loss, loss0, rtol=1e-5)
    for g, g0 in zip(grads, grads0, strict=True):
        np.testing.assert_allclose(g, g0, rtol=1e-4, atol=1e-6 * np.abs(g0).max())


def test_dropout_is_on_and_keyed():
    """The comparison above would be vacuous if the key did nothing: it changes the loss."""
    base = _base()
    state, m, z = base["args"]
    graphdef = nnx.graphdef(EvoformerStack(small_config(num_blocks=2), rngs=nnx.Rngs(0)))
    fn = _loss_grad_fn(graphdef, make_inputs(seed=4)[2:4], None)
    loss_nodrop, _ = fn(state, m, z)
    assert abs(float(loss_nodrop) - float(base["result"][0])) > 1e-3 * abs(float(loss_nodrop))


def test_layout_degree_one_is_identity():
    lay = dap.Layout(None, 1, None, 2, 5, 11)
    x = jnp.arange(2 * 5 * 11 * 3, dtype=jnp.float32).reshape(2, 5, 11, 3)
    assert lay.local(x, 1) is x and lay.gather(x, 2) is x and lay.swap(x, 2, 1) is x


def test_padding_helpers():
    assert dap.padded(11, 4) == 12 and dap.padded(8, 8) == 8
    x = np.random.default_rng(0).normal(size=(2, 5, 3)).astype(np.float32)
    y = np.asarray(dap.pad_axis(jnp.asarray(x), 1, 8))
    assert y.shape == (2, 8, 3) and np.array_equal(y[:, :5], x) and not y[:, 5:].any()


@pytest.mark.parametrize("sizes, attention, match", [
    ({"dap": 4}, "ring", "attention='ring'"),
    ({"dap": 4}, "ulysses", "attention='ulysses'"),
    ({"dap": 2, "tensor": 4}, "xla", "tensor"),
    ({"dap": 2, "sequence": 2}, "xla", "sequence"),
])
def test_bad_combinations_refused(sizes, attention, match):
    with pytest.raises(ValueError, match=match):
        dap.check_dap(sizes, attention)


def test_model_without_dap_refused():
    with pytest.raises(ValueError, match="does not support Dynamic Axial Parallelism"):
        dap.check_dap({"dap": 8}, "xla", supports_dap=False, what="transformer")
    dap.check_dap({"dap": 1, "tensor": 8}, "ring", supports_dap=False)  # no dap axis: nothing to check


def test_stack_refuses_unsupported_attention_before_compiling():
    cfg = small_config(num_blocks=1, attention="ulysses")
    stack = EvoformerStack(cfg, rngs=nnx.Rngs(0))
    m, z, msa_mask, pair_mask, _ = make_inputs()
    with jax.set_mesh(make_mesh(ParallelConfig(dap=2))):
        with pytest.raises(ValueError, match="dap=2 with attention='ulysses'"):
            jax.eval_shape(lambda m, z: stack(m, z, msa_mask, pair_mask), m, z)


def test_mesh_parses_dap():
    cfg = ParallelConfig.parse("data=2,dap=4")
    assert cfg.dap == 4 and cfg.data == 2
    mesh = make_mesh(cfg)
    assert mesh.shape["dap"] == 4 and mesh.shape["data"] == 2


@pytest.mark.slow
def test_train_msa_evoformer_on_dap_resumes_at_another_degree(tmp_path):
    """`sciscale train msa-evoformer --mesh dap=8` trains like one device; its checkpoint resumes on
    data=2,dap=4 with ZeRO-2 with the parameters unchanged."""
    from sciscale_jax.recipes import get_recipe
    from sciscale_jax.train import TrainConfig, train

    recipe = get_recipe("msa-evoformer")
    model = recipe.config_class(**{**recipe.model_defaults, **dict(
        c_m=8, c_z=8, msa_heads=2, msa_head_dim=4, pair_heads=2, pair_head_dim=4, opm_channels=4,
        tri_mul_channels=8, num_blocks=1, num_seq=5)})

    def run(out, mesh, **kw):
        cfg = TrainConfig(steps=2, batch_size=2, seq_len=11, eval_every=1000, save_every=2, log_every=1,
                          warmup_steps=1, seed=1, mesh=mesh, **kw)
        return train(recipe, model, cfg, out, progress=False, log=lambda *_: None,
                     resume=(out / "checkpoints").exists())

    one = run(tmp_path / "one", "")
    sharded = run(tmp_path / "dap", "dap=8")
    leaves, leaves0 = jax.tree.leaves(sharded["state"].params), jax.tree.leaves(one["state"].params)
    scale = max(np.abs(np.asarray(x)).max() for x in leaves0)
    for a, b in zip(leaves, leaves0, strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5 * scale)
    resumed = run(tmp_path / "dap", "data=2,dap=4", zero=2)
    assert resumed["steps"] == 2
    for a, b in zip(jax.tree.leaves(resumed["state"].params), leaves, strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))



_TRAIN = {}


def _tiny_model():
    from sciscale_jax.recipes import get_recipe
    recipe = get_recipe("msa-evoformer")
    return recipe, recipe.config_class(**{**recipe.model_defaults, **dict(
        c_m=8, c_z=8, msa_heads=2, msa_head_dim=4, pair_heads=2, pair_head_dim=4, opm_channels=4,
        tri_mul_channels=8, num_blocks=1, num_seq=5)})


def _train_tiny(out, mesh, **kw):
    from sciscale_jax.train import TrainConfig, train
    recipe, model = _tiny_model()
    cfg = TrainConfig(steps=2, batch_size=2, seq_len=11, eval_every=1000, save_every=1000, log_every=1,
                      warmup_steps=1, seed=1, mesh=mesh, **kw)
    return train(recipe, model, cfg, out, progress=False, log=lambda *_: None)


def _data_sharded(tree) -> bool:
    return any("data" in jax.tree.leaves(tuple(x.sharding.spec)) for x in jax.tree.leaves(tree)
               if hasattr(x.sharding, "spec"))


@pytest.mark.parametrize("zero", [pytest.param(1, marks=pytest.mark.slow), 3])
def test_train_msa_evoformer_dap_with_data_and_zero(tmp_path, zero):
    """`sciscale train msa-evoformer --mesh data=2,dap=4 --zero 1|3`: two steps give the parameters of
    the one-device run; ZeRO-1 shards the optimizer state over data, ZeRO-3 the parameters too
    (DAP's shard_map gathers them per device)."""
    if "one" not in _TRAIN:
        recipe, model = _tiny_model()
        init = jax.tree.leaves(nnx.state(recipe.build_model(model, nnx.Rngs(1)), nnx.Param))
        trained = jax.tree.map(np.asarray, jax.tree.leaves(_train_tiny(tmp_path / "one", "")["state"].params))
        assert [a.shape for a in trained] == [b.shape for b in init]
        moved = max(np.abs(a - np.asarray(b)).max() for a, b in zip(trained, init, strict=True))
        print(f"largest parameter change in two steps: {moved:.3g}")
        _TRAIN.update(one=trained, moved=moved)
    leaves0 = _TRAIN["one"]
    scale = max(np.abs(x).max() for x in leaves0)
    assert _TRAIN["moved"] > 100 * 1e-5 * scale  # the steps change the parameters far beyond the tolerance
    result = _train_tiny(tmp_path / "dap", "data=2,dap=4", zero=zero)
    assert result["steps"] == 2
    assert _data_sharded(result["state"].opt_state)
    assert _data_sharded(result["state"].params) == (zero == 3)
    for a, b in zip(jax.tree.leaves(result["state"].params), leaves0, strict=True):
        np.testing.assert_allclose(np.asarray(a), b, rtol=1e-4, atol=1e-5 * scale)
