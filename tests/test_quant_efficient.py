"""EfficientQAT: group quantiser grid and gradients against the formula in NumPy; Block-AP
beats round-to-nearest on its block; E2E-QP trains only step sizes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sciscale_jax.quant.efficient_qat import (GroupQuant, block_ap_sequential, dequantize, e2e_qp,
                                              fake_quant_group, freeze, init_group_quant,
                                              quantized_kernels)

G = 4  # tiny stand-in for the paper's 64/128; the same code path


def test_init_grid_and_freeze_roundtrip():
    rng = np.random.default_rng(1)
    w = rng.normal(size=(12, 5)) * rng.uniform(0.2, 2, size=(1, 5))
    for bits in (2, 3, 4, 8):
        qp = init_group_quant(jnp.asarray(w, jnp.float32), bits, G)
        y = np.asarray(fake_quant_group(jnp.asarray(w, jnp.float32), qp, bits, G), np.float64)
        wg, yg = w.reshape(3, G, 5), y.reshape(3, G, 5)
        s = (wg.max(1, keepdims=True) - wg.min(1, keepdims=True)) / (2**bits - 1)
        z = np.round(-wg.min(1, keepdims=True) / s)
        k = yg / s + z
        np.testing.assert_allclose(k, np.round(k), atol=1e-3)
        assert k.min() >= -1e-3 and k.max() <= 2**bits - 1 + 1e-3
        fw = freeze(jnp.asarray(w, jnp.float32), qp, bits, G)
        assert fw.w_int.dtype == jnp.uint8 and int(fw.w_int.max()) <= 2**bits - 1
        np.testing.assert_allclose(dequantize(fw, w.shape), y, rtol=1e-6, atol=1e-6)


def test_gradients_follow_ste_and_clamp_rule():
    rng = np.random.default_rng(2)
    bits, qmax = 3, 7
    w = rng.normal(size=(8, 3))
    s = np.abs(rng.normal(size=(2, 1, 3))) * 0.15 + 0.05  # small steps: some weights clamp
    z = rng.uniform(2, 5, size=(2, 1, 3))
    g = rng.normal(size=(8, 3))
    f = lambda w_, s_, z_: fake_quant_group(w_, GroupQuant(s_, z_), bits, G)
    _, vjp = jax.vjp(f, *(jnp.asarray(t, jnp.float32) for t in (w, s, z)))
    dw, ds, dz = (np.asarray(t, np.float64) for t in vjp(jnp.asarray(g, jnp.float32)))
    # The formula, written plainly: v = w/s + round(z); inside iff 0 <= round(v) <= qmax.
    wg, gg = w.reshape(2, G, 3), g.reshape(2, G, 3)
    zr = np.round(z)
    v = wg / s + zr
    inside = (np.round(v) >= 0) & (np.round(v) <= qmax)
    q = np.clip(np.round(v), 0, qmax)
    assert inside.any() and (~inside).any()
    np.testing.assert_allclose(dw, np.where(inside, gg, 0).reshape(8, 3), rtol=1e-5, atol=1e-6)
    ds_ref = (gg * np.where(inside, q - zr - wg / s, q - zr)).sum(1, keepdims=True)
    dz_ref = (gg * np.where(inside, 0.0, -s)).sum(1, keepdims=True)
    np.testing.assert_allclose(ds, ds_ref, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(dz, dz_ref, rtol=1e-4, atol=1e-5)


class _Block(nnx.Module):
    def __init__(self, dim, hidden, *, rngs):
        self.norm = nnx.RMSNorm(dim, rngs=rngs)
        self.wi = nnx.Linear(dim, hidden, rngs=rngs)
        self.wo = nnx.Linear(hidden, dim, rngs=rngs)

    def __call__(self, x):
        return x + self.wo(jax.nn.gelu(self.wi(self.norm(x))))


class _Model(nnx.Module):
    def __init__(self, *, rngs):
        self.blocks = nnx.List([_Block(8, 12, rngs=rngs) for _ in range(2)])
        self.head = nnx.Linear(8, 3, rngs=rngs)

    def __call__(self, x):
        for b in self.blocks:
            x = b(x)
        return self.head(x)


def test_block_ap_beats_rtn_then_e2e_trains_only_scales():
    rng = np.random.default_rng(3)
    bits = 2  # coarse, so quantisation error is large and training has room
    model = _Model(rngs=nnx.Rngs(0))
    x = jnp.asarray(rng.normal(size=(64, 8)), jnp.float32)
    y_fp = model(x)
    fp_params = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model, nnx.Param)))
    # Round-to-nearest baseline: min/max init, no training.
    rtn = _Model(rngs=nnx.Rngs(0))
    for b in rtn.blocks:
        for key in quantized_kernels(b):
            mod = getattr(b, key.split("/")[0])
            mod.kernel[...] = fake_quant_group(mod.kernel[...], init_group_quant(mod.kernel[...], bits, G), bits, G)
    err_rtn = float(jnp.mean((rtn(x) - y_fp) ** 2))

    frozen = block_ap_sequential(model.blocks, x, bits=bits, group_size=G, steps=60,
                                 learning_rate=3e-3, qparam_learning_rate=3e-3)
    assert set(frozen[0]) == {"wi/kernel", "wo/kernel"}
    err_ap = float(jnp.mean((model(x) - y_fp) ** 2))
    assert err_ap < 0.8 * err_rtn, (err_ap, err_rtn)
    # Kernels now hold dequantised integer weights.
    for b, fz in zip(model.blocks, frozen):
        for key, fw in fz.items():
            mod = getattr(b, key.split("/")[0])
            np.testing.assert_array_equal(mod.kernel[...], dequantize(fw, mod.kernel[...].shape))
    # E2E-QP on the whole model's loss: only the step sizes move.
    full = {f"blocks/{i}/{k}": fw for i, fz in enumerate(frozen) for k, fw in fz.items()}
    before = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model, nnx.Param)))
    loss = lambda m, batch: jnp.mean((m(batch) - y_fp) ** 2)
    first = float(loss(model, x))
    trained = e2e_qp(model, full, loss, [x] * 40, learning_rate=1e-3)
    assert float(loss(model, x)) < first
    after = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    np.testing.assert_array_equal(after["head"]["kernel"], before["head"]["kernel"])
    np.testing.assert_array_equal(after["blocks"][0]["norm"]["scale"], before["blocks"][0]["norm"]["scale"])
    for k, fw in trained.items():
        np.testing.assert_array_equal(fw.w_int, full[k].w_int)
        np.testing.assert_array_equal(fw.zero, full[k].zero)
        assert not np.array_equal(fw.scale, full[k].scale)
    assert fp_params["head"]["kernel"].shape == (8, 3)


def test_bad_efficient_qat_input():
    w = jnp.ones((12, 5))
    with pytest.raises(ValueError, match="group_size=5 does not divide the input dimension 12"):
        init_group_quant(w, 4, 5)
    with pytest.raises(ValueError, match="bits=9"):
        init_group_quant(w, 9, 4)
    with pytest.raises(ValueError, match="not kernels of the model"):
        e2e_qp(_Model(rngs=nnx.Rngs(0)), {"nope/kernel": None}, lambda m, b: 0.0, [])
