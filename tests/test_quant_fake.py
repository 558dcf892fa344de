"""Fake quantisation: values on their n-bit grids for every width and granularity,
straight-through gradients inside / outside the clip range, bad input."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sciscale_jax.quant.fake_quant import fake_quant

ROWS, COLS, GROUP = 5, 12, 4


def _np_groups(x, granularity):
    """x as [num_groups, members] in float64: the reference grouping, written plainly."""
    if granularity == "tensor":
        return x.reshape(1, -1)
    if granularity == "channel":  # axis=-1: one scale per column
        return x.T.copy()
    if granularity == "token":    # axis=-1: one scale per row
        return x.copy()
    return x.reshape(ROWS * COLS // GROUP, GROUP)  # contiguous groups along the last axis


def _to_groups(y, granularity):
    return _np_groups(np.asarray(y, np.float64), granularity)


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("granularity", ["tensor", "channel", "token", "group"])
def test_values_lie_on_their_grid(granularity, symmetric):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(ROWS, COLS)) * rng.uniform(0.5, 3.0, size=(1, COLS)) + 0.3
    xg = _np_groups(x.astype(np.float32).astype(np.float64), granularity)
    for bits in range(2, 9):
        y = fake_quant(jnp.asarray(x, jnp.float32), bits, symmetric=symmetric,
                       granularity=granularity, group_size=GROUP)
        yg = _to_groups(y, granularity)
        if symmetric:
            qmax = 2 ** (bits - 1) - 1
            scale = np.abs(xg).max(axis=1, keepdims=True) / qmax
            k = yg / scale
            lo, hi = -qmax, qmax
        else:
            qmax = 2**bits - 1
            scale = (xg.max(axis=1, keepdims=True) - xg.min(axis=1, keepdims=True)) / qmax
            zero = np.round(-xg.min(axis=1, keepdims=True) / scale)
            k = yg / scale + zero
            lo, hi = 0, qmax
        np.testing.assert_allclose(k, np.round(k), atol=2e-4, err_msg=f"bits={bits}")
        assert k.min() >= lo - 1e-3 and k.max() <= hi + 1e-3
        # Nearest grid point: the error is at most half a step.
        assert np.all(np.abs(yg - xg) <= scale / 2 * (1 + 1e-4) + 1e-7), f"bits={bits}"
        assert max(len(np.unique(np.round(r, 6))) for r in k) <= 2**bits


@pytest.mark.parametrize("symmetric", [True, False])
def test_ste_passes_inside_blocks_outside(symmetric):
    rng = np.random.default_rng(1)
    x = rng.normal(size=(7, 9))
    g = rng.normal(size=(7, 9))
    bits, ratio = 3, 0.5
    f = lambda t: fake_quant(t, bits, symmetric=symmetric, clip_ratio=ratio)
    _, vjp = jax.vjp(f, jnp.asarray(x, jnp.float32))
    (dx,) = vjp(jnp.asarray(g, jnp.float32))
    # Reference: inside = the unrounded grid coordinate rounds to a level without clipping.
    if symmetric:
        qmax = 2 ** (bits - 1) - 1
        scale = ratio * np.abs(x).max() / qmax
        v, lo, hi = x / scale, -qmax, qmax
    else:
        qmax = 2**bits - 1
        scale = ratio * (x.max() - x.min()) / qmax
        v, lo, hi = x / scale + np.round(-ratio * x.min() / scale), 0, qmax
    inside = (v >= lo - 0.5) & (v <= hi + 0.5)
    assert inside.any() and (~inside).any()
    np.testing.assert_array_equal(np.asarray(dx), np.where(inside, g.astype(np.float32), 0.0))
    # The identity rule passes the gradient everywhere.
    _, vjp = jax.vjp(lambda t: fake_quant(t, bits, clip_ratio=ratio, ste_rule="identity"),
                     jnp.asarray(x, jnp.float32))
    np.testing.assert_array_equal(vjp(jnp.asarray(g, jnp.float32))[0], g.astype(np.float32))


def test_group_and_channel_axis_choice():
    rng = np.random.default_rng(2)
    w = jnp.asarray(rng.normal(size=(8, 3)), jnp.float32)  # [in, out]: groups along `in`
    y = np.asarray(fake_quant(w, 4, granularity="group", axis=0, group_size=4), np.float64)
    wn = np.asarray(w, np.float64)
    for col, start in itertools.product(range(3), (0, 4)):
        seg, yseg = wn[start:start + 4, col], y[start:start + 4, col]
        k = yseg / (np.abs(seg).max() / 7)
        np.testing.assert_allclose(k, np.round(k), atol=2e-4)


def test_bad_fake_quant_input():
    x = jnp.ones((5, 12))
    for bits in (1, 9, 0):
        with pytest.raises(ValueError, match=f"bits={bits}.*\\[2, 8\\]"):
            fake_quant(x, bits)
    with pytest.raises(ValueError, match="group_size=5 does not divide dimension 12"):
        fake_quant(x, 4, granularity="group", group_size=5)
    with pytest.raises(ValueError, match="'row'"):
        fake_quant(x, 4, granularity="row")
    with pytest.raises(ValueError, match="clip_ratio=1.5"):
        fake_quant(x, 4, clip_ratio=1.5)
