"""Gradient accumulation equals the full-batch loss and gradient, uneven token counts included."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sciscale_jax.accumulate import accumulate_gradients, split_microbatches

V, D, B, T = 11, 6, 8, 5


def _init(key, dtype=jnp.float32):
    k1, k2, k3 = jax.random.split(key, 3)
    return {"emb": jax.random.normal(k1, (V, D), dtype), "w": jax.random.normal(k2, (D, D), dtype) / 3,
            "out": jax.random.normal(k3, (D, V), dtype) / 3}


def _token_mean_loss(params, mb):
    """Cross entropy averaged over the real (mask == 1) tokens of the (micro)batch."""
    h = jnp.tanh(params["emb"][mb["tokens"]] @ params["w"])
    logp = jax.nn.log_softmax((h @ params["out"]).astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(logp, mb["targets"][..., None], axis=-1)[..., 0]
    m = mb["mask"].astype(jnp.float32)
    return jnp.sum(nll * m) / jnp.sum(m)


def _batch(key, mask):
    k1, k2 = jax.random.split(key)
    return {"tokens": jax.random.randint(k1, (B, T), 0, V), "targets": jax.random.randint(k2, (B, T), 0, V),
            "mask": jnp.asarray(mask, jnp.int32)}


def _uneven_mask():
    """Real-token counts per row differ: strided microbatches hold 8 and 12 tokens (n=2),
    6, 7, 2 and 5 (n=4), and with n=8 one microbatch (row 3) holds none."""
    lengths = [1, 2, 1, 0, 5, 5, 1, 5]
    return (np.arange(T)[None, :] < np.array(lengths)[:, None]).astype(np.int32)


def _relerr(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.abs(a - b).max() / np.abs(b).max()


@pytest.fixture(scope="module")
def problem():
    params, batch = _init(jax.random.key(0)), _batch(jax.random.key(1), _uneven_mask())
    with jax.enable_x64():  # independent reference: the whole batch at once, in float64
        p64 = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
        loss64, g64 = jax.value_and_grad(_token_mean_loss)(p64, batch)
        ref = (float(loss64), jax.tree.map(np.asarray, g64))
    return params, batch, ref


@pytest.mark.parametrize("n", [pytest.param(1, marks=pytest.mark.slow), pytest.param(2, marks=pytest.mark.slow), 4, 8])
def test_token_weighted_accumulation_equals_full_batch(problem, n):
    """Weighting by real-token counts recovers the full-batch loss and gradient exactly."""
    params, batch, (loss_ref, g_ref) = problem
    weight = lambda mb: jnp.sum(mb["mask"])
    loss, g = jax.jit(lambda p, b: accumulate_gradients(_token_mean_loss, p, b, n, weight_fn=weight))(
        params, batch)
    assert loss.dtype == jnp.float32
    assert abs(float(loss) - loss_ref) / abs(loss_ref) < 1e-5   # float32 sums vs float64: ~1e-7 each, margin
    for a, r in zip(jax.tree.leaves(g), jax.tree.leaves(g_ref)):
        assert _relerr(a, r) < 1e-5   # reordered float32 sums


def test_unweighted_mean_of_means_differs_with_uneven_tokens(problem):
    """Without token weighting the answer is wrong for uneven counts: the weighting matters."""
    params, batch, (loss_ref, _) = problem
    loss, _ = accumulate_gradients(_token_mean_loss, params, batch, 2)
    assert abs(float(loss) - loss_ref) / abs(loss_ref) > 1e-3


def test_equal_weights_match_per_example_mean():
    """With no weight_fn, a per-example mean loss accumulates to the full-batch mean."""
    params, batch = _init(jax.random.key(2)), _batch(jax.random.key(3), np.ones((B, T)))
    loss_ref, g_ref = jax.value_and_grad(_token_mean_loss)(params, batch)
    loss, g = accumulate_gradients(_token_mean_loss, params, batch, 4)
    assert abs(float(loss - loss_ref)) / abs(float(loss_ref)) < 1e-5
    for a, r in zip(jax.tree.leaves(g), jax.tree.leaves(g_ref)):
        assert _relerr(a, r) < 1e-5   # reordered float32 sums


def test_bf16_params_float32_accumulator_and_aux():
    """bfloat16 params: gradients come back in the float32 accumulator; aux stacks per microbatch."""
    params = _init(jax.random.key(4), jnp.bfloat16)
    batch = _batch(jax.random.key(5), _uneven_mask())
    aux_loss = lambda p, mb: (_token_mean_loss(p, mb), jnp.sum(mb["mask"]))
    (loss, counts), g = accumulate_gradients(aux_loss, params, batch, 4, has_aux=True,
                                             weight_fn=lambda mb: jnp.sum(mb["mask"]))
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(g)) and loss.dtype == jnp.float32
    np.testing.assert_array_equal(counts, _uneven_mask().reshape(B // 4, 4, T).sum(axis=(0, 2)))
    (_, _), g16 = accumulate_gradients(aux_loss, params, batch, 4, has_aux=True, accum_dtype=jnp.bfloat16)
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(g16))


def test_all_padding_microbatch_adds_nothing():
    """A microbatch with zero real tokens (0/0 loss) is skipped, not a NaN."""
    mask = np.ones((B, T), np.int32)
    mask[1::2] = 0  # strided split into 2: microbatch 1 = rows 1, 3, 5, 7, all padding
    params, batch = _init(jax.random.key(6)), _batch(jax.random.key(7), mask)
    loss, g = accumulate_gradients(_token_mean_loss, params, batch, 2, weight_fn=lambda mb: jnp.sum(mb["mask"]))
    sub = jax.tree.map(lambda x: x[0::2], batch)
    loss_ref, g_ref = jax.value_and_grad(_token_mean_loss)(params, sub)
    assert np.isfinite(float(loss)) and abs(float(loss - loss_ref)) / abs(float(loss_ref)) < 1e-5
    for a, r in zip(jax.tree.leaves(g), jax.tree.leaves(g_ref)):
        assert _relerr(a, r) < 1e-5   # reordered float32 sums


def test_microbatches_cut_activation_memory():
    """Compiled temp memory falls with more microbatches at a fixed global batch."""
    params = jax.eval_shape(lambda: _init(jax.random.key(0)))
    big = {"tokens": jax.ShapeDtypeStruct((64, 128), jnp.int32), "targets": jax.ShapeDtypeStruct((64, 128), jnp.int32),
           "mask": jax.ShapeDtypeStruct((64, 128), jnp.int32)}
    temp = lambda n: jax.jit(lambda p, b: accumulate_gradients(_token_mean_loss, p, b, n)).lower(
        params, big).compile().memory_analysis().temp_size_in_bytes
    t1, t8 = temp(1), temp(8)
    assert t8 < t1 / 2, (t1, t8)


def test_split_is_strided():
    x = jnp.arange(12).reshape(6, 2)
    np.testing.assert_array_equal(split_microbatches({"x": x}, 3)["x"][1], x[1::3])


@pytest.mark.parametrize("n, batch, match", [
    (3, {"x": jnp.ones((8, 2))}, r"num_microbatches=3 does not divide the batch size 8"),
    (0, {"x": jnp.ones((8, 2))}, r"positive integer, got 0"),
    (2, {"x": jnp.ones((8, 2)), "y": jnp.ones((6,))}, r"same leading batch size; got leading dims \[\(6,\), \(8,\)\]"),
    (2, {}, r"no arrays"),
])
def test_bad_input_raises(n, batch, match):
    with pytest.raises(ValueError, match=match):
        accumulate_gradients(lambda p, b: jnp.sum(p), jnp.ones(2), batch, n)
