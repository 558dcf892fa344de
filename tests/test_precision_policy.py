"""Dtype policies: presets, casting only floating leaves, bad names and dtypes."""

import jax.numpy as jnp
import numpy as np
import pytest

from sciscale_jax.precision.policy import POLICIES, Policy, get_policy


def test_presets_have_the_documented_dtypes():
    expect = {  # (param, compute, output, loss_scaling, fp8), from the issue text
        "fp32": (jnp.float32, jnp.float32, jnp.float32, False, False),
        "bf16": (jnp.float32, jnp.bfloat16, jnp.float32, False, False),
        "fp16": (jnp.float32, jnp.float16, jnp.float32, True, False),
        "fp8": (jnp.float32, jnp.bfloat16, jnp.float32, False, True),
    }
    assert set(POLICIES) == set(expect)
    for name, (p, c, o, ls, f8) in expect.items():
        pol = get_policy(name)
        assert (pol.param_dtype, pol.compute_dtype, pol.output_dtype) == tuple(map(np.dtype, (p, c, o)))
        assert (pol.loss_scaling, pol.fp8) == (ls, f8)


def test_casts_touch_only_floating_leaves():
    rng = np.random.default_rng(0)
    tree = {"w": jnp.asarray(rng.normal(size=(3, 5)), jnp.float32),
            "ids": jnp.asarray(rng.integers(0, 9, size=(7,)), jnp.int32)}
    pol = get_policy("fp16")
    c = pol.cast_to_compute(tree)
    assert c["w"].dtype == jnp.float16 and c["ids"].dtype == jnp.int32
    np.testing.assert_array_equal(c["ids"], tree["ids"])
    np.testing.assert_allclose(np.asarray(c["w"], np.float64), np.asarray(tree["w"], np.float64), rtol=2**-11)
    back = pol.cast_to_param(c)
    assert back["w"].dtype == jnp.float32
    assert get_policy(pol) is pol


def test_bad_input_names_the_values():
    with pytest.raises(ValueError, match="'fp4'"):
        get_policy("fp4")
    with pytest.raises(ValueError, match="compute_dtype=int8"):
        Policy(jnp.float32, jnp.int8, jnp.float32)
    with pytest.raises(ValueError, match="fp8=True.*float64"):
        Policy(jnp.float32, jnp.float64, jnp.float32, fp8=True)
