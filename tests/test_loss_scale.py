"""Dynamic loss scaling: the scale rule, jit/checkpoint round trips, overflow storms."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from sciscale_jax.precision.loss_scale import (DynamicLossScale, dynamic_loss_scaling,
                                               loss_scale_metrics, loss_scale_of, skip_nonfinite)


def _reference_scales(flags, s, period, factor, min_scale):
    """The rule written plainly: grow after `period` finite steps, back off on overflow."""
    out, counter = [], 0
    for finite in flags:
        if finite:
            counter += 1
            if counter >= period:
                s, counter = s * factor, 0
        else:
            s, counter = max(s / factor, min_scale), 0
        out.append(s)
    return out


def test_every_field_survives_jit_and_checkpoint(tmp_path):
    import orbax.checkpoint as ocp

    ls = DynamicLossScale.create(initial_scale=64.0, period=3, factor=4.0, min_loss_scale=0.5)
    through_jit = jax.jit(lambda s: s.adjust(jnp.array(False)))(ls)
    # min_loss_scale, factor and period must still be there (jmp drops min_loss_scale).
    assert float(through_jit.min_loss_scale) == 0.5 and float(through_jit.factor) == 4.0
    assert int(through_jit.period) == 3 and float(through_jit.loss_scale) == 16.0
    with ocp.StandardCheckpointer() as ckpt:
        ckpt.save(os.fspath(tmp_path / "ls"), through_jit)
        ckpt.wait_until_finished()
        restored = ckpt.restore(os.fspath(tmp_path / "ls"), through_jit)
    assert type(restored) is DynamicLossScale
    for a, b in zip(restored, through_jit):
        assert a.dtype == b.dtype and float(a) == float(b)


def test_scale_sequence_matches_rule_under_jit():
    flags = [True, True, True, False, True, False, False, False, False, False, True, True, True, True]
    ls = DynamicLossScale.create(initial_scale=8.0, period=3, factor=2.0, min_loss_scale=1.0)
    step = jax.jit(lambda s, f: s.adjust(f))
    got = []
    for f in flags:
        ls = step(ls, jnp.array(f))
        got.append(float(ls.loss_scale))
    assert got == _reference_scales(flags, 8.0, 3, 2.0, 1.0)


def _problem():
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.normal(size=(11, 5)), jnp.float32)
    y = jnp.asarray(rng.normal(size=(11, 3)), jnp.float32)
    params = {"w": jnp.asarray(rng.normal(size=(5, 3)), jnp.float32),
              "b": jnp.asarray(rng.normal(size=(3,)), jnp.float32)}
    loss = lambda p: jnp.mean((x @ p["w"] + p["b"] - y) ** 2)
    return params, loss


@pytest.mark.parametrize("wrapper", ["loss_scale", "skip"])
def test_overflow_storm_skips_and_training_continues(wrapper):
    params, loss = _problem()
    period, factor, init_scale, min_scale = 3, 2.0, 16.0, 1.0
    if wrapper == "loss_scale":
        tx = dynamic_loss_scaling(optax.adam(1e-2), initial_scale=init_scale, period=period,
                                  factor=factor, min_loss_scale=min_scale)
    else:
        tx = skip_nonfinite(optax.adam(1e-2))
    ref_tx = optax.adam(1e-2)  # the unwrapped optimizer on the true gradients
    state, ref_state, ref_params = tx.init(params), ref_tx.init(params), params

    @jax.jit
    def step(p, s, poison):
        scale = loss_scale_of(s)
        g = jax.grad(lambda q: loss(q) * scale)(p)
        g = jax.tree.map(lambda t: jnp.where(poison, jnp.inf, t), g)
        u, s = tx.update(g, s, p)
        return optax.apply_updates(p, u), s

    storm = 9  # longer than the back-off to the floor (4 halvings) and than period
    flags = [True] * 4 + [False] * storm + [True] * 7
    scales = []
    for finite in flags:
        before_p, before_s = params, state
        params, state = step(params, state, jnp.array(not finite))
        if finite:  # equals the plain optimizer on the true gradient
            g = jax.grad(loss)(ref_params)
            u, ref_state = ref_tx.update(g, ref_state, ref_params)
            ref_params = optax.apply_updates(ref_params, u)
            jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
                         params, ref_params)
        else:  # bit-for-bit unchanged parameters and inner optimizer state
            jax.tree.map(np.testing.assert_array_equal, params, before_p)
            jax.tree.map(np.testing.assert_array_equal, state.inner_state, before_s.inner_state)
        scales.append(float(loss_scale_of(state)))
    assert int(state.skipped_steps) == storm and int(state.consecutive_skips) == 0
    chained = (optax.EmptyState(), state)  # found inside a chain too
    assert int(loss_scale_metrics(chained)["skipped_steps"]) == storm
    assert float(loss_scale_metrics(chained)["loss_scale"]) == scales[-1]
    if wrapper == "loss_scale":
        assert scales == _reference_scales(flags, init_scale, period, factor, min_scale)
        assert min(scales) == min_scale and scales[-1] > min_scale  # backed off, regrew


def test_bad_loss_scale_arguments():
    with pytest.raises(ValueError, match="min_loss_scale=0"):
        DynamicLossScale.create(min_loss_scale=0)
    with pytest.raises(ValueError, match="factor=1.0"):
        DynamicLossScale.create(factor=1.0)
    with pytest.raises(ValueError, match="initial_scale=0.5"):
        DynamicLossScale.create(initial_scale=0.5, min_loss_scale=1.0)
    with pytest.raises(ValueError, match="period=0"):
        DynamicLossScale.create(period=0)
