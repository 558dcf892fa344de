"""Remat policies: same gradients under every policy, memory ordering, grouping, offload, errors."""

import contextlib
import io
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.ad_checkpoint import checkpoint_name, print_saved_residuals

from sciscale_jax import remat

HEADS = 2


def _block(p, x_btd, *, key=None, drop=0.0):
    """A pre-norm transformer block in plain JAX, tagged with the remat vocabulary."""
    x_btd = checkpoint_name(x_btd, remat.LAYER_INPUT)

    def norm(h):
        mu = h.mean(-1, keepdims=True)
        return (h - mu) * jax.lax.rsqrt(((h - mu) ** 2).mean(-1, keepdims=True) + 1e-5)

    b, t, d = x_btd.shape
    h_btd = checkpoint_name(norm(x_btd), remat.ATTN_NORM)
    qkv = checkpoint_name(h_btd @ p["wqkv"], remat.QKV).reshape(b, t, 3, HEADS, d // HEADS)
    q_bthd, k_bthd, v_bthd = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    logits_bhqk = checkpoint_name(jnp.einsum("bqhd,bkhd->bhqk", q_bthd, k_bthd) / (d // HEADS) ** 0.5,
                                  remat.ATTN_LOGITS)
    probs_bhqk = jax.nn.softmax(logits_bhqk, axis=-1)
    if key is not None:  # dropout on the probabilities, recomputed from the key
        keep = jax.random.bernoulli(key, 1 - drop, probs_bhqk.shape)
        probs_bhqk = jnp.where(keep, probs_bhqk / (1 - drop), 0.0)
    probs_bhqk = checkpoint_name(probs_bhqk, remat.ATTN_PROBS)
    ctx_bthd = checkpoint_name(jnp.einsum("bhqk,bkhd->bqhd", probs_bhqk, v_bthd), remat.ATTN_CONTEXT)
    x_btd = x_btd + checkpoint_name(ctx_bthd.reshape(b, t, d) @ p["wo"], remat.ATTN_OUT)
    h_btd = checkpoint_name(norm(x_btd), remat.MLP_NORM)
    hid_btf = checkpoint_name(jax.nn.gelu(h_btd @ p["w1"]), remat.MLP_HIDDEN)
    return x_btd + checkpoint_name(hid_btf @ p["w2"], remat.MLP_OUT)


def _params(key, d, f, layers=None):
    lead = () if layers is None else (layers,)
    ks = jax.random.split(key, 4)
    shapes = {"wqkv": (d, 3 * d), "wo": (d, d), "w1": (d, f), "w2": (f, d)}
    return {n: jax.random.normal(k, lead + s) / np.sqrt(s[0]) for (n, s), k in zip(shapes.items(), ks)}


_SLOW = pytest.mark.slow
ALL_POLICIES = ["full", "selective", "offload:qkv,mlp_hidden",
                {"attn_context": "save", "mlp_hidden": "offload", "attn_logits": "recompute"},
                pytest.param("dots", marks=_SLOW), pytest.param("dots_no_batch", marks=_SLOW),
                pytest.param("every_k:1", marks=_SLOW),
                pytest.param("custom:qkv=save,attn_probs=offload,mlp_hidden=recompute", marks=_SLOW)]
_KEY_PARAMS, _KEY_X, _KEY_DROP = jax.random.split(jax.random.key(0), 3)


def _block_loss(block):
    return lambda p, x: jnp.sum(jnp.sin(block(p, x, key=_KEY_DROP, drop=0.25)))


def _f64(tree):
    return jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), tree)


@pytest.fixture(scope="module")
def block_problem():
    # Remat recomputes the same operations, so the gradients are equal up to the order XLA
    # sums in; float64 makes that a bound (1e-12) no CPU's vector width can break.
    with jax.enable_x64():
        params, x = _f64(_params(_KEY_PARAMS, 12, 20)), _f64(jax.random.normal(_KEY_X, (3, 7, 12)))
        return params, x, jax.grad(_block_loss(_block), argnums=(0, 1))(params, x)


def _rel_err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.abs(a - b).max() / np.abs(b).max()


@pytest.mark.parametrize("policy", ALL_POLICIES, ids=str)
def test_block_gradients_equal_across_policies(block_problem, policy):
    """Gradients w.r.t. params and input (dropout included) match the un-rematted block."""
    params, x, ref = block_problem
    # eager (un-jitted) autodiff: the primitive compile cache is shared across the cases
    with jax.enable_x64():
        got = jax.grad(_block_loss(remat.remat_block(_block, policy)), argnums=(0, 1))(params, x)
    for g, r in zip(jax.tree.leaves(got), jax.tree.leaves(ref)):
        assert g.dtype == jnp.float64 and _rel_err(g, r) < 1e-12


@pytest.mark.slow
def test_block_gradient_matches_finite_differences():
    """The reference gradient itself (under "full") agrees with central differences in float64."""
    with jax.enable_x64():
        kp, kx, kv = jax.random.split(jax.random.key(1), 3)
        params = jax.tree.map(lambda a: a.astype(jnp.float64), _params(kp, 6, 10))
        x = jax.random.normal(kx, (1, 5, 6), jnp.float64)
        f = lambda p: jnp.sum(jnp.sin(remat.remat_block(_block, "full")(p, x)))
        g = jax.grad(f)(params)
        v = jax.tree.map(lambda a: jax.random.normal(kv, a.shape, a.dtype), params)
        eps = 1e-6
        plus = f(jax.tree.map(lambda a, b: a + eps * b, params, v))
        minus = f(jax.tree.map(lambda a, b: a - eps * b, params, v))
        fd = (plus - minus) / (2 * eps)
        analytic = sum(jnp.vdot(a, b) for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(v)))
        np.testing.assert_allclose(analytic, fd, rtol=1e-7)


def _temp_bytes(policy, seq, layers=None, d=32, f=64):
    x = jax.ShapeDtypeStruct((1, seq, d), jnp.float32)
    p = jax.eval_shape(lambda: _params(jax.random.key(0), d, f, layers))
    if layers is None:
        fn = lambda p, x: jnp.sum(remat.remat_block(_block, policy)(p, x) ** 2)
    else:
        fn = lambda p, x: jnp.sum(remat.apply_layers(_block, x, p, policy) ** 2)
    mem = jax.jit(jax.grad(fn)).lower(p, x).compile().memory_analysis()
    return mem.temp_size_in_bytes


def test_compiled_memory_ordered_none_selective_full():
    """At seq 512 the attention core dominates: none > selective > full in compiled temp bytes."""
    none, sel, full = (_temp_bytes(p, 512, layers=2) for p in ("none", "selective", "full"))
    assert none > sel > full, (none, sel, full)
    # selective drops at least one [H, S, S] float32 tensor per block
    assert none - sel >= 2 * HEADS * 512 * 512 * 4


def test_full_memory_grows_by_one_block_input_per_layer():
    """Under "full" in a scanned stack, each extra layer keeps only its [B, S, D] input."""
    seq, d = 256, 32
    t2, t6 = (_temp_bytes("full", seq, layers=n, d=d) for n in (2, 6))
    per_layer = (t6 - t2) / 4
    assert per_layer == pytest.approx(seq * d * 4, rel=0.05), (t2, t6, per_layer)


def test_every_k_keeps_one_input_per_group():
    """Under "every_k:2" the saved residuals grow by half a block input per layer."""
    seq, d = 256, 32
    t4, t8 = (_temp_bytes("every_k:2", seq, layers=n, d=d) for n in (4, 8))
    per_layer = (t8 - t4) / 4
    assert per_layer == pytest.approx(seq * d * 4 / 2, rel=0.05), (t4, t8, per_layer)


_STACK_CASES = [("every_k:2", True), ("every_k:3", False),
                pytest.param("none", True, marks=_SLOW), pytest.param("selective", False, marks=_SLOW),
                pytest.param("full", True, marks=_SLOW), pytest.param("selective", True, marks=_SLOW),
                pytest.param("every_k:3", True, marks=_SLOW), pytest.param("none", False, marks=_SLOW),
                pytest.param("full", False, marks=_SLOW), pytest.param("every_k:2", False, marks=_SLOW)]


@pytest.mark.parametrize("policy, scan", _STACK_CASES)
def test_apply_layers_gradients(policy, scan):
    """A 6-layer stack under every policy, scanned or looped, matches a plain Python loop.

    Scan versus loop reorders float sums (by about 1e-6 relative in float32, more or less
    with the CPU's vector width), so the comparison runs in float64 with a 1e-12 bound.
    """
    with jax.enable_x64():
        _apply_layers_gradients(policy, scan)


def _apply_layers_gradients(policy, scan):
    kp, kx = jax.random.split(jax.random.key(2))
    stacked, x = _f64(_params(kp, 8, 12, layers=6)), _f64(jax.random.normal(kx, (2, 5, 8)))
    per_layer = [jax.tree.map(lambda a: a[i], stacked) for i in range(6)]

    def ref_loss(ps, x):
        for p in ps:
            x = _block(p, x)
        return jnp.sum(jnp.cos(x))

    ref = jax.grad(ref_loss, argnums=(0, 1))(per_layer, x)
    params = stacked if scan else per_layer
    got = jax.grad(lambda p, x: jnp.sum(jnp.cos(remat.apply_layers(_block, x, p, policy, scan=scan))),
                   argnums=(0, 1))(params, x)
    if scan:
        got = ([jax.tree.map(lambda a: a[i], got[0]) for i in range(6)], got[1])
    for g, r in zip(jax.tree.leaves(got), jax.tree.leaves(ref)):
        assert g.dtype == jnp.float64 and _rel_err(g, r) < 1e-12


def test_offload_policy_moves_named_residuals_to_host():
    """Under "offload:qkv,mlp_hidden" exactly the qkv and mlp_hidden residuals live in host memory."""
    b, t, d, f = 1, 9, 8, 12
    params, x = _params(jax.random.key(3), d, f), jax.random.normal(jax.random.key(4), (b, t, d))

    def host_residual_shapes(policy):
        grad_fn = jax.grad(lambda p: jnp.sum(remat.remat_block(_block, policy)(p, x)))
        jaxpr = jax.make_jaxpr(grad_fn)(params).jaxpr
        puts = [e for e in jaxpr.eqns if e.primitive.name == "device_put"]
        return sorted(tuple(v.aval.shape) for e in puts for v in e.outvars
                      if "host" in str(v.aval.memory_space).lower())

    assert host_residual_shapes("full") == []
    assert host_residual_shapes("offload:qkv,mlp_hidden") == sorted([(b, t, 3 * d), (b, t, f)])
    assert host_residual_shapes({"attn_probs": "offload", "qkv": "save"}) == [(b, HEADS, t, t)]


def test_parse_and_policies():
    assert remat.parse_remat("every_k:4") == remat.RematSpec("every_k", every_k=4)
    spec = remat.parse_remat("offload:qkv, mlp_hidden")
    assert spec.kind == "offload" and spec.offload == {"qkv", "mlp_hidden"} and not spec.save
    assert remat.parse_remat({"qkv": "save"}) == remat.parse_remat("custom:qkv=save")
    assert remat.checkpoint_policy("none") is None
    assert remat.layer_group_size("every_k:3", 6) == 3 and remat.layer_group_size("full", 6) == 1
    f = lambda x: x * 2
    assert remat.remat_block(f, "none") is f and remat.remat_block(f, "every_k:2") is f


@pytest.mark.parametrize("policy, match", [
    ("sometimes", r"unknown remat policy 'sometimes'"),
    ("every_k:0", r"every_k needs a positive integer k, got '0'"),
    ("every_k:x", r"got 'x'"),
    ("offload:", r"names no activation"),
    ("offload:qkv,attn_scores", r"unknown checkpoint name\(s\) \['attn_scores'\]"),
    ({"mlp_hiden": "save"}, r"unknown checkpoint name\(s\) \['mlp_hiden'\]"),
    ({"qkv": "keep"}, r"unknown action\(s\) \{'qkv': 'keep'\}"),
    ("custom:qkv", r"expected <name>=<action>, got 'qkv'"),
    (3, r"must be a string or a mapping, got 3"),
])
def test_bad_policies_raise(policy, match):
    with pytest.raises(ValueError, match=match):
        remat.validate_remat(policy)


def test_every_k_must_divide_depth():
    with pytest.raises(ValueError, match=r"every_k=4 does not divide num_layers=6"):
        remat.validate_remat("every_k:4", num_layers=6)
    stacked = _params(jax.random.key(0), 4, 4, layers=6)
    with pytest.raises(ValueError, match=r"every_k=4 does not divide num_layers=6"):
        remat.apply_layers(_block, jnp.ones((1, 3, 4)), stacked, "every_k:4")


# What each named policy must keep, read from jax's own account of the residuals that the
# backward pass of one block closes over (``print_saved_residuals``): (kind, shape, on host),
# with kind "argument", a checkpoint name, or the primitive that produced the value.
_B, _T, _D, _F = 3, 7, 12, 20
_HD = _D // HEADS
_WEIGHTS = [("argument", s, False) for s in ((_D, 3 * _D), (_D, _D), (_D, _F), (_F, _D))]
_ARGS = _WEIGHTS + [("argument", (_B, _T, _D), False)]
_WEIGHT_DOTS = [("dot_general", s, False) for s in ((_B, _T, 3 * _D), (_B, _T, _D), (_B, _T, _F))]
# The two attention dots carry batch dims (batch, heads): q.k^T and probs @ v.
_BATCHED_DOTS = [("dot_general", (_B, HEADS, _T, _T), False), ("dot_general", (_B, HEADS, _HD, _T), False)]
_EXPECTED_RESIDUALS = {
    "full": _ARGS,
    "dots": _ARGS + _WEIGHT_DOTS + _BATCHED_DOTS,
    "dots_no_batch": _ARGS + _WEIGHT_DOTS,
    # every tagged activation but logits and probabilities, plus weight-matmul outputs not
    # already kept under a name (the MLP's pre-activation h @ w1)
    "selective": _WEIGHTS + [(n, (_B, _T, _D), False) for n in ("layer_input", "attn_norm", "attn_out", "mlp_norm")]
    + [("qkv", (_B, _T, 3 * _D), False), ("attn_context", (_B, _T, HEADS, _HD), False),
       ("mlp_hidden", (_B, _T, _F), False), ("dot_general", (_B, _T, _F), False)],
    "offload:qkv,mlp_hidden": _ARGS + [("device_put", (_B, _T, 3 * _D), True), ("device_put", (_B, _T, _F), True)],
    "custom:qkv=save,attn_probs=offload,mlp_hidden=recompute":
        _ARGS + [("qkv", (_B, _T, 3 * _D), False), ("device_put", (_B, HEADS, _T, _T), True)],
}


def _saved_residuals(fn, *args) -> list[tuple]:
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        print_saved_residuals(fn, *args)
    out = []
    for line in buf.getvalue().splitlines():
        m = re.match(r"(\w+)(<host>)?\[([\d,]*)\] (.*)", line)
        assert m, line
        shape = tuple(int(s) for s in m[3].split(",") if s)
        desc = m[4]
        named, made = re.match(r"named '(\w+)'", desc), re.match(r"output of (\w+)", desc)
        kind = ("argument" if desc.startswith("from the argument") else named[1] if named
                else made[1] if made else desc)
        out.append((kind, shape, m[2] is not None))
    return sorted(out)


@pytest.fixture(scope="module")
def residual_problem():
    return _params(jax.random.key(5), _D, _F), jax.random.normal(jax.random.key(6), (_B, _T, _D))


@pytest.mark.parametrize("policy", list(_EXPECTED_RESIDUALS))
def test_policy_keeps_exactly_its_residuals(residual_problem, policy):
    """Each named policy keeps exactly what it promises: swapping any two policies fails here."""
    params, x = residual_problem
    got = _saved_residuals(remat.remat_block(_block, policy), params, x)
    assert got == sorted(_EXPECTED_RESIDUALS[policy])


def test_none_keeps_the_attention_core(residual_problem):
    """Without remat the backward pass keeps softmax's exp and the probabilities, [B, H, T, T] each."""
    params, x = residual_problem
    got = _saved_residuals(remat.remat_block(_block, "none"), params, x)
    square = [k for k, s, _ in got if s == (_B, HEADS, _T, _T)]
    assert sorted(square) == ["attn_probs", "exp"]
    assert len(got) > len(_EXPECTED_RESIDUALS["selective"])


@pytest.mark.parametrize("k", [1, 2, 4])
@pytest.mark.parametrize("scan", [False, True])
def test_every_k_residuals_are_group_inputs(residual_problem, k, scan):
    """every_k:k over 4 layers keeps the input of each group of k blocks and no other activation."""
    layers = 4
    stacked = _params(jax.random.key(7), _D, _F, layers=layers)
    params = stacked if scan else [jax.tree.map(lambda a, i=i: a[i], stacked) for i in range(layers)]
    x = residual_problem[1]
    got = _saved_residuals(lambda p, x: remat.apply_layers(_block, x, p, f"every_k:{k}", scan=scan), params, x)
    acts = [(kind, s) for kind, s, _ in got if s[-3:] == (_B, _T, _D)]
    if scan:    # the group inputs, stacked by the scan over groups (x among them)
        assert acts == [("scan", (layers // k, _B, _T, _D))]
    else:       # x, then the output of every group but the last
        assert sorted(acts) == [("add", (_B, _T, _D))] * (layers // k - 1) + [("argument", (_B, _T, _D))]
