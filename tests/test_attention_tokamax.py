"""impl="tokamax": the tokamax package behind the front door (optional; Python >= 3.12 and
jax >= 0.11.1, so skipped where it does not import). Against the xla implementation on CPU
(tokamax runs its XLA kernel there): bias, mask, causal, GQA, and gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sciscale_jax.attention import core
from sciscale_jax.attention.tokamax_backend import available as _available


def test_without_tokamax_the_front_door_refuses_in_one_line():
    if _available():
        pytest.skip("tokamax is installed")
    q = jnp.ones((1, 8, 2, 16), jnp.float32)
    with pytest.raises(ValueError, match="needs the tokamax package"):
        core.dot_product_attention(q, q, q, impl="tokamax")


@pytest.mark.skipif(not _available(), reason="tokamax not installed (needs Python >= 3.12, jax >= 0.11.1)")
@pytest.mark.parametrize("causal", [False, True])
def test_tokamax_matches_xla_with_bias_mask_and_gqa(causal):
    r = np.random.default_rng(0)
    q = jnp.asarray(r.normal(size=(2, 24, 4, 16)), jnp.float32)
    k = jnp.asarray(r.normal(size=(2, 24, 2, 16)), jnp.float32)
    v = jnp.asarray(r.normal(size=(2, 24, 2, 16)), jnp.float32)
    bias = jnp.asarray(r.normal(size=(1, 4, 24, 24)), jnp.float32)
    mask = jnp.asarray(r.random((2, 1, 1, 24)) < 0.8).at[:, :, :, 0].set(True)
    do = jnp.asarray(r.normal(size=q.shape), jnp.float32)

    def run(impl):
        f = lambda q, k, v, b: core.dot_product_attention(q, k, v, bias=b, mask=mask, causal=causal, impl=impl)
        out, vjp = jax.vjp(f, q, k, v, bias)
        return (out,) + vjp(do)

    for got, want in zip(run("tokamax"), run("xla")):
        np.testing.assert_allclose(got, want, rtol=2e-4, atol=2e-4)
