"""fp8 matmul: rounding bounds, equality with the dequantised float matmul (forward and
backward), delayed scaling against the rule written plainly, optimizer isolation."""

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import optax
import pytest
from flax import nnx

from sciscale_jax.precision.fp8 import (PARAMS_AND_FP8, Fp8Config, Fp8Linear, Fp8Matmul, Fp8Meta,
                                        apply_fp8_meta, dequantize, fp8_matmul, quantize)

E4M3_MAX, E5M2_MAX = 448.0, 57344.0


def _np_qdq(x, scale, fmt, fmax):
    """Independent reference: numpy + ml_dtypes rounding, float64 arithmetic."""
    q = np.clip(np.asarray(x, np.float64) / scale, -fmax, fmax).astype(fmt)
    return q.astype(np.float64) * scale


@pytest.mark.parametrize("dtype,bound,lo,hi", [(jnp.float8_e4m3fn, 2.0**-4, -5, 8),
                                                (jnp.float8_e5m2, 2.0**-3, -13, 15)])
def test_rounding_error_within_format_bound(dtype, bound, lo, hi):
    rng = np.random.default_rng(0)
    mags = 2.0 ** rng.uniform(lo, hi, size=4001)  # inside the normal range of the format
    x = jnp.asarray(mags * rng.choice([-1.0, 1.0], size=mags.shape), jnp.float32)
    scale = jnp.float32(0.75)
    back = np.asarray(dequantize(quantize(x * 0.75, scale, dtype), scale), np.float64)
    rel = np.abs(back - np.asarray(x * 0.75, np.float64)) / np.abs(np.asarray(x * 0.75, np.float64))
    assert rel.max() <= bound and rel.max() > bound / 4  # tight, and not vacuously exact


def _operands(n=7, k=13, m=5, seed=1):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, k)) * 3.0
    w = rng.normal(size=(k, m)) * 0.2
    g = rng.normal(size=(n, m)) * 1e-3
    return x, w, g


def _meta(hist=4):
    one, zeros = jnp.ones((), jnp.float32), jnp.zeros((hist,), jnp.float32)
    return (one, zeros, one, zeros, one, zeros)


def test_current_scaling_equals_float_matmul_of_dequantised_operands():
    x, w, g = _operands()
    cfg = Fp8Config(scaling="current", history_len=4)
    y, vjp = jax.vjp(lambda a, b, m: fp8_matmul(cfg, a, b, m),
                     jnp.asarray(x, jnp.float32), jnp.asarray(w, jnp.float32), _meta())
    dx, dw, new_meta = vjp(jnp.asarray(g, jnp.float32))
    sx, sw, sg = (np.abs(t).max() / fm for t, fm in ((x, E4M3_MAX), (w, E4M3_MAX), (g, E5M2_MAX)))
    xd, wd = _np_qdq(x, sx, ml_dtypes.float8_e4m3fn, E4M3_MAX), _np_qdq(w, sw, ml_dtypes.float8_e4m3fn, E4M3_MAX)
    gd = _np_qdq(g, sg, ml_dtypes.float8_e5m2, E5M2_MAX)
    np.testing.assert_allclose(y, xd @ wd, rtol=1e-5, atol=1e-6 * np.abs(xd @ wd).max())
    np.testing.assert_allclose(dx, gd @ wd.T, rtol=1e-5, atol=1e-6 * np.abs(gd @ wd.T).max())
    np.testing.assert_allclose(dw, xd.T @ gd, rtol=1e-5, atol=1e-6 * np.abs(xd.T @ gd).max())
    # fp8 is close to, but not equal to, the exact product.
    err = np.abs(np.asarray(y) - x @ w).max() / np.abs(x @ w).max()
    assert 1e-4 < err < 0.1
    # The cotangent of the metadata is its new value: current scales, amax pushed in front.
    np.testing.assert_allclose(new_meta[0], sx, rtol=1e-6)
    np.testing.assert_allclose(new_meta[4], sg, rtol=1e-6)
    np.testing.assert_allclose(new_meta[5], [np.abs(g).max(), 0, 0, 0], rtol=1e-6)


def test_delayed_scaling_follows_history_rule_over_steps():
    hist_len, margin, steps = 3, 1.0, 6
    model = Fp8Linear(13, 5, rngs=nnx.Rngs(0), dtype=jnp.float32, history_len=hist_len, margin=margin)
    opt = nnx.Optimizer(model, optax.sgd(1e-3), wrt=nnx.Param)
    rng = np.random.default_rng(2)
    amps = [1.0, 4.0, 0.5, 0.25, 0.1, 2.0]  # amax rises, then falls out of the window

    @nnx.jit
    def step(model, opt, x, c):
        def loss(model):
            y = model(x)
            return jnp.sum(y * c), y
        grads, y = nnx.grad(loss, argnums=nnx.DiffState(0, PARAMS_AND_FP8), has_aux=True)(model)
        grads = apply_fp8_meta(model, grads)
        opt.update(model, grads)
        return y

    # Reference: the rule written plainly, applied to each step's amax.
    ref = {r: (1.0, [0.0] * hist_len) for r in "xwg"}
    fmax = {"x": E4M3_MAX, "w": E4M3_MAX, "g": E5M2_MAX}
    for t in range(steps):
        x = rng.normal(size=(7, 13)) * amps[t]
        c = rng.normal(size=(7, 5)) * amps[steps - 1 - t]
        w_before = np.asarray(model.kernel[...], np.float64)
        y = step(model, opt, jnp.asarray(x, jnp.float32), jnp.asarray(c, jnp.float32))
        # Delayed: this step's forward used the scales stored by the previous steps.
        xd = _np_qdq(x.astype(np.float32), np.float32(ref["x"][0]), ml_dtypes.float8_e4m3fn, E4M3_MAX)
        wd = _np_qdq(w_before, np.float32(ref["w"][0]), ml_dtypes.float8_e4m3fn, E4M3_MAX)
        np.testing.assert_allclose(y, xd @ wd, rtol=1e-5, atol=1e-5 * np.abs(xd @ wd).max())
        for r, a in (("x", np.abs(x).max()), ("w", np.abs(w_before).max()), ("g", np.abs(c).max())):
            scale, h = ref[r]
            h = [a] + h[:-1]
            if max(h) > 0:
                scale = 2.0**margin * max(h) / fmax[r]
            ref[r] = (scale, h)
            np.testing.assert_allclose(getattr(model.matmul, f"{r}_amax_history")[...], h, rtol=1e-6)
            np.testing.assert_allclose(getattr(model.matmul, f"{r}_scale")[...], scale, rtol=1e-6)
    # The optimizer state holds no fp8 metadata.
    assert not jax.tree.leaves(nnx.state(opt, Fp8Meta))


def test_delayed_forward_uses_stored_scale():
    x, w, _ = _operands(seed=3)
    cfg = Fp8Config(scaling="delayed", history_len=2)
    sx, sw = 0.02, 0.003  # deliberately not the current amax: x saturates at 448 * sx
    meta = (jnp.float32(sx), jnp.zeros(2), jnp.float32(sw), jnp.zeros(2), jnp.float32(1.0), jnp.zeros(2))
    y = fp8_matmul(cfg, jnp.asarray(x, jnp.float32), jnp.asarray(w, jnp.float32), meta)
    xd = _np_qdq(x, np.float32(sx), ml_dtypes.float8_e4m3fn, E4M3_MAX)
    wd = _np_qdq(w, np.float32(sw), ml_dtypes.float8_e4m3fn, E4M3_MAX)
    np.testing.assert_allclose(y, xd @ wd, rtol=1e-5, atol=1e-6 * np.abs(xd @ wd).max())


def test_linear_gradients_close_to_float_reference_and_bf16_compute():
    x, w, _ = _operands(seed=4)
    model = Fp8Linear(13, 5, rngs=nnx.Rngs(1), dtype=jnp.bfloat16, scaling="current", history_len=2)
    model.kernel[...] = jnp.asarray(w, jnp.float32)
    y = model(jnp.asarray(x, jnp.float32))
    assert y.dtype == jnp.bfloat16
    gw = nnx.grad(lambda m: jnp.sum(m(jnp.asarray(x, jnp.float32)).astype(jnp.float32) ** 2))(model)
    ref = 2 * x.T @ (x @ w)
    got = np.asarray(gw["kernel"][...], np.float64)
    assert np.abs(got - ref).max() / np.abs(ref).max() < 0.1


def test_bad_fp8_input():
    with pytest.raises(ValueError, match="fwd_dtype=float16"):
        Fp8Config(fwd_dtype=jnp.float16)
    with pytest.raises(ValueError, match="'sometimes'"):
        Fp8Matmul(scaling="sometimes")
    with pytest.raises(ValueError, match="history_len=0"):
        Fp8Matmul(history_len=0)
    with pytest.raises(ValueError, match="dtype int32"):
        Fp8Matmul(history_len=2)(jnp.ones((3, 4), jnp.int32), jnp.ones((4, 2)))
    with pytest.raises(ValueError, match=r"\(3, 4\).*\(5, 2\)"):
        Fp8Matmul(history_len=2)(jnp.ones((3, 4)), jnp.ones((5, 2)))


def test_fp8_grad_fn_loss_scale_scales_grads_not_meta():
    from sciscale_jax.precision.fp8 import fp8_grad_fn, fp8_paths, split_pure

    rng = np.random.default_rng(5)
    model = Fp8Linear(13, 5, rngs=nnx.Rngs(0), dtype=jnp.float32, scaling="current", history_len=2)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    params, rest = nnx.to_pure_dict(params), nnx.to_pure_dict(rest)
    batch = {"x": jnp.asarray(rng.normal(size=(7, 13)), jnp.float32),
             "c": jnp.asarray(rng.normal(size=(7, 5)), jnp.float32)}
    loss_fn = lambda m, b, key: (jnp.sum(m(b["x"]) * b["c"]), jnp.float32(7.0))
    grad_fn = jax.jit(fp8_grad_fn(graphdef, loss_fn, fp8_paths(model)))
    loss1, (_, rest1), g1 = grad_fn(params, rest, batch, None)
    loss2, (_, rest2), g2 = grad_fn(params, rest, batch, None, 2.0**10)
    assert float(loss1) == float(loss2)
    # Current scaling is invariant to a power-of-two loss scale: exactly 2**10 times the grad.
    np.testing.assert_array_equal(g2["kernel"], g1["kernel"] * 2.0**10)
    m1, m2 = split_pure(rest1, fp8_paths(model))[0], split_pure(rest2, fp8_paths(model))[0]
    np.testing.assert_array_equal(m1["matmul"]["x_scale"], m2["matmul"]["x_scale"])
    np.testing.assert_allclose(m2["matmul"]["g_scale"], m1["matmul"]["g_scale"] * 2.0**10, rtol=1e-6)
    assert set(g1) == {"kernel"}
