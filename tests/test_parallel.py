"""Meshes, rule tables, bad-input errors, and Ulysses / ring attention against a float64 reference."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, PartitionSpec as P

from sciscale_jax.attention import dot_product_attention, xla_attention
from sciscale_jax.parallel import (MESH_AXES, ParallelConfig, batch_sharding, logical_to_mesh, make_mesh,
                                   ring_attention, rules_for, shard_params, train_shardings,
                                   ulysses_attention, with_logical_constraint, zigzag_permutation)


# ---------------------------------------------------------------- mesh

def test_config_fills_minus_one_and_mesh_is_auto():
    mesh = make_mesh(ParallelConfig(data=-1, tensor=2))
    assert dict(mesh.shape) == {"pipeline": 1, "data": 4, "fsdp": 1, "dap": 1, "sequence": 1, "tensor2": 1, "tensor": 2}
    assert mesh.axis_names == MESH_AXES and set(mesh.axis_types) == {AxisType.Auto}
    assert ParallelConfig.parse("data=2, fsdp=2,tensor=2") == ParallelConfig(data=2, fsdp=2, tensor=2)


@pytest.mark.parametrize("config, match", [
    (ParallelConfig(data=2, tensor=3), r"data=2xtensor=3 has 6 devices but 8"),
    (ParallelConfig(data=-1, tensor=-1), r"at most one mesh axis may be -1"),
    (ParallelConfig(data=-1, tensor=3), r"other axes multiply to 3, which does not divide the 8"),
    (ParallelConfig(data=0), r"positive integers or -1"),
])
def test_bad_mesh_is_a_value_error(config, match):
    with pytest.raises(ValueError, match=match):
        make_mesh(config)


def test_parse_rejects_unknown_axis():
    with pytest.raises(ValueError, match="'model=2'"):
        ParallelConfig.parse("model=2")


# ---------------------------------------------------------------- rules

def test_sequence_parallel_priority_puts_tensor_on_heads_inside_and_seq_outside():
    mesh = make_mesh(ParallelConfig(data=4, tensor=2))
    rules = rules_for("tp_sp")
    assert logical_to_mesh(("batch", "seq", "embed"), rules, mesh) == P("data", "tensor", None)
    assert logical_to_mesh(("batch", "seq", "heads", "kv"), rules, mesh) == P("data", None, "tensor", None)
    assert logical_to_mesh(("embed", "mlp"), rules, mesh) == P(None, "tensor")
    # Without a mesh every rule applies, size-1 axes included.
    assert logical_to_mesh(("batch", "seq"), rules) == P(("data", "fsdp"), ("sequence", "tensor"))


def test_2d_and_fsdp_tables_and_overrides():
    mesh = make_mesh(ParallelConfig(tensor2=2, tensor=4))
    assert logical_to_mesh(("embed", "mlp"), rules_for("tp2d"), mesh) == P("tensor2", "tensor")
    assert logical_to_mesh(("batch", "seq", "embed"), rules_for("tp2d"), mesh) == P(None, None, "tensor2")
    fsdp = make_mesh(ParallelConfig(fsdp=8))
    # batch takes fsdp first, so activations are not split on embed; weights are.
    assert logical_to_mesh(("batch", "seq", "embed"), rules_for("fsdp"), fsdp) == P("fsdp", None, None)
    assert logical_to_mesh(("embed", "mlp"), rules_for("fsdp"), fsdp) == P("fsdp", None)
    custom = rules_for("tp", {"mlp": None, "kv": "tensor"})
    assert logical_to_mesh(("embed", "mlp"), custom, mesh) == P(None, None)
    # overrides go first, so kv wins the tensor axis over heads
    assert logical_to_mesh(("heads", "kv"), custom, mesh) == P(None, "tensor")
    with pytest.raises(ValueError, match="unknown parallel strategy 'megatron'"):
        rules_for("megatron")


def test_with_logical_constraint_is_a_no_op_without_a_mesh_and_shards_with_one():
    x = jnp.arange(8 * 6, dtype=jnp.float32).reshape(8, 6)
    assert with_logical_constraint(x, ("batch", "embed"), rules_for("dp")) is x
    mesh = make_mesh(ParallelConfig(data=8))
    with jax.set_mesh(mesh):
        y = jax.jit(lambda x: with_logical_constraint(x * 2, ("batch", "embed"), rules_for("dp")))(x)
    assert y.sharding.spec[0] == "data"
    np.testing.assert_array_equal(np.asarray(y), 2 * np.asarray(x))


def test_shard_params_reads_nnx_partitioning_metadata():
    from flax import nnx

    with nnx.use_eager_sharding(False):
        layer = nnx.Linear(6, 16, rngs=nnx.Rngs(0),
                           kernel_init=nnx.with_partitioning(nnx.initializers.lecun_normal(), ("embed", "mlp")),
                           bias_init=nnx.with_partitioning(nnx.initializers.normal(), ("mlp",)))
    state = nnx.state(layer, nnx.Param)
    mesh = make_mesh(ParallelConfig(data=2, tensor=4))
    placed = shard_params(state, rules_for("tp"), mesh)
    kernel, bias = placed["kernel"].get_value(), placed["bias"].get_value()
    assert kernel.sharding.spec == P(None, "tensor") and bias.sharding.spec == P("tensor")
    np.testing.assert_array_equal(np.asarray(kernel), np.asarray(state["kernel"].get_value()))


# ---------------------------------------------------------------- bad input, before compilation

def test_batch_not_divisible_by_data_times_fsdp():
    mesh = make_mesh(ParallelConfig(data=2, fsdp=4))
    with pytest.raises(ValueError, match=r"size 6 is not divisible by \('data', 'fsdp'\)=8"):
        batch_sharding((6, 16), ("batch", "seq"), rules_for("fsdp"), mesh)


def test_heads_not_divisible_by_tensor():
    mesh = make_mesh(ParallelConfig(tensor=8))
    params = {"wq": jax.ShapeDtypeStruct((16, 12, 4), jnp.float32)}
    with pytest.raises(ValueError, match=r"size 12 is not divisible by tensor=8"):
        train_shardings(params, {"wq": ("embed", "heads", "kv")}, rules_for("tp"), mesh, 0)


def _abstract(b, s, h, d, kv_heads=None):
    q = jax.ShapeDtypeStruct((b, s, h, d), jnp.float32)
    kv = jax.ShapeDtypeStruct((b, s, kv_heads or h, d), jnp.float32)
    return q, kv, kv


def test_ulysses_heads_not_divisible():
    mesh = make_mesh(ParallelConfig(sequence=8))
    with jax.set_mesh(mesh), pytest.raises(ValueError, match=r"num_heads=12 is not divisible by .* = 8"):
        jax.eval_shape(lambda q, k, v: ulysses_attention(q, k, v), *_abstract(2, 16, 12, 4))


def test_ring_zigzag_seq_not_divisible():
    mesh = make_mesh(ParallelConfig(sequence=8))
    with jax.set_mesh(mesh), pytest.raises(ValueError, match=r"seq_len=24 is not divisible by 2 x ring degree .* 16"):
        jax.eval_shape(lambda q, k, v: ring_attention(q, k, v, causal=True), *_abstract(2, 24, 2, 4))
    with jax.set_mesh(mesh):  # the same length is fine without zigzag
        jax.eval_shape(lambda q, k, v: ring_attention(q, k, v, causal=False), *_abstract(2, 24, 2, 4))


# ---------------------------------------------------------------- zigzag

@pytest.mark.parametrize("degree", [2, 4, 8])
def test_zigzag_balances_causal_work(degree):
    seq = 4 * degree
    perm = zigzag_permutation(seq, degree)
    assert sorted(perm) == list(range(seq))
    blocks = perm.reshape(degree, -1)  # device i's query positions
    work = [(blocks[i][:, None] >= np.arange(seq)[None, :]).sum() for i in range(degree)]
    assert len(set(work)) == 1, work
    plain = [(np.arange(seq).reshape(degree, -1)[i][:, None] >= np.arange(seq)).sum() for i in range(degree)]
    assert len(set(plain)) == degree  # contiguous blocks would be unbalanced


# ---------------------------------------------------------------- sequence-parallel attention

def numpy_attention(q, k, v, bias, mask, causal):
    """softmax(q k^T / sqrt(d) + bias) v in float64, masked; rows with no key give zeros."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    group = q.shape[2] // k.shape[2]
    k, v = np.repeat(k, group, axis=2), np.repeat(v, group, axis=2)
    s = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(q.shape[-1]) + np.asarray(bias, np.float64)
    valid = np.broadcast_to(np.asarray(mask), s.shape).copy()
    if causal:
        valid &= np.tril(np.ones(s.shape[-2:], bool))
    s = np.where(valid, s, -np.inf)
    smax = np.max(s, -1, keepdims=True)
    p = np.where(valid, np.exp(s - np.where(np.isfinite(smax), smax, 0)), 0)
    denom = p.sum(-1, keepdims=True)
    p = p / np.where(denom > 0, denom, 1)
    return np.einsum("bhqk,bkhd->bqhd", p, v)


@pytest.mark.parametrize("impl, sizes, causal", [
    ("ring", dict(sequence=4, data=2), False),
    ("ring", dict(sequence=4, tensor=2), True),
    ("ulysses", dict(sequence=4, data=2), True),
    pytest.param("ulysses", dict(sequence=2, tensor=4), False, marks=pytest.mark.slow),
])
def test_sequence_parallel_attention_matches_float64_and_gradients(impl, sizes, causal):
    rng = np.random.default_rng(3)
    b, s, h, kvh, d = 2, 16, 8, 4, 3
    q = jnp.asarray(rng.normal(size=(b, s, h, d)), jnp.float32)
    k, v = (jnp.asarray(rng.normal(size=(b, s, kvh, d)), jnp.float32) for _ in range(2))
    bias = jnp.asarray(rng.normal(size=(1, h, s, s)), jnp.float32)  # shared over the batch
    mask = rng.random((b, 1, 1, s)) > 0.25  # key padding, travels with the keys
    mask[0, 0, 0, :] = False
    mask[0, 0, 0, 5] = True  # batch 0: under causal, rows 0-4 see no key at all
    mask = jnp.asarray(mask)
    cot = jnp.asarray(rng.normal(size=(b, s, h, d)), jnp.float32)

    def loss(fn):
        return lambda q, k, v, bias: jnp.sum(cot * fn(q, k, v, bias=bias, mask=mask, causal=causal))

    def out_and_grads(*args):  # through the front door, one compile for both
        out, vjp = jax.vjp(lambda *a: dot_product_attention(*a[:3], bias=a[3], mask=mask, causal=causal,
                                                             impl=impl), *args)
        return out, vjp(cot)

    with jax.set_mesh(make_mesh(ParallelConfig(**sizes))):
        out, grads = jax.jit(out_and_grads)(q, k, v, bias)
    np.testing.assert_allclose(out, numpy_attention(q, k, v, bias, mask, causal), rtol=2e-5, atol=2e-6)
    ref_grads = jax.jit(jax.grad(loss(xla_attention), argnums=(0, 1, 2, 3)))(q, k, v, bias)
    for name, g, r in zip(("dq", "dk", "dv", "dbias"), grads, ref_grads):
        np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-5, err_msg=name)
    # the attention gradient against finite differences in float64 along a random direction
    dirs = [rng.normal(size=x.shape) for x in (q, k, v, bias)]
    f = lambda t: np.sum(np.asarray(cot, np.float64) * numpy_attention(
        *(np.asarray(x, np.float64) + t * u for x, u in zip((q, k, v, bias), dirs)), mask, causal))
    fd = (f(1e-5) - f(-1e-5)) / 2e-5
    analytic = sum(np.sum(np.asarray(g, np.float64) * u) for g, u in zip(grads, dirs))
    np.testing.assert_allclose(analytic, fd, rtol=1e-4)
