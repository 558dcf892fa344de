"""Weight decay: 0 unless asked, a ``mask`` on every optimizer with a decay, and the default mask.

References: Lion's and AdamW's first steps written out by hand; decoupled decay adds exactly
−lr·wd·θ to the decay-free update on the parameters the mask selects and nothing elsewhere;
the default mask checked leaf by leaf on a real NNX Transformer's parameter tree.
"""

import inspect

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sciscale_jax.models.transformer import Transformer, TransformerConfig
from sciscale_jax.optim import OPTIMIZERS, default_decay_mask, get_optimizer, is_zeroth_order, registry

LR, WD = 0.05, 0.1


def _tree():
    rng = np.random.default_rng(3)
    a = lambda *s: jnp.asarray(rng.normal(size=s), jnp.float32)  # noqa: E731
    return {"dense": {"kernel": a(5, 3), "bias": a(3)}, "norm": {"scale": a(3)}, "pair": (a(4, 3), a(2, 2))}


def _loss(p):
    return sum(jnp.sum(0.5 * x * x + jnp.sin(x)) for x in jax.tree.leaves(p))


def _first_update(opt, params, zo):
    state = opt.init(params)
    if zo:
        return opt.update(None, state, params, value_fn=_loss)[0]
    return jax.jit(lambda g, s, p: opt.update(g, s, p)[0])(jax.grad(_loss)(params), state, params)


def _has_decay(name):
    return "weight_decay" in inspect.signature(registry.factory(name)).parameters


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_decay_defaults_to_zero(name):
    """Every registered factory states its decay, and it is 0 (sm3 has none)."""
    params = inspect.signature(registry.factory(name)).parameters
    if name == "sm3":
        assert "weight_decay" not in params and "mask" not in params
    else:
        assert params["weight_decay"].default == 0.0 and params["mask"].default is None


def test_lion_without_decay_is_the_plain_sign_update():
    """get_optimizer("lion", lr): u1 = −lr·sign(g1); u2 = −lr·sign(b1·(1−b2)·g1 + (1−b1)·g2); no decay."""
    rng = np.random.default_rng(0)
    p = {"w": jnp.asarray(rng.normal(size=(4, 5)) * 10, jnp.float32)}   # large θ: any decay would show
    g1, g2 = ({"w": jnp.asarray(rng.normal(size=(4, 5)), jnp.float32)} for _ in range(2))
    opt = get_optimizer("lion", LR)
    u1, s = opt.update(g1, opt.init(p), p)
    u2, _ = opt.update(g2, s, p)
    b1, b2 = 0.9, 0.99
    np.testing.assert_array_equal(np.asarray(u1["w"]), -LR * np.sign(np.asarray(g1["w"])))
    c = b1 * (1 - b2) * np.asarray(g1["w"], np.float64) + (1 - b1) * np.asarray(g2["w"], np.float64)
    np.testing.assert_allclose(np.asarray(u2["w"]), -LR * np.sign(c), rtol=1e-6)
    # asked for, the decay is there: −lr·(sign(g1) + wd·θ)
    opt = get_optimizer("lion", LR, weight_decay=WD)
    u1, _ = opt.update(g1, opt.init(p), p)
    np.testing.assert_allclose(np.asarray(u1["w"]),
                               -LR * (np.sign(np.asarray(g1["w"])) + WD * np.asarray(p["w"])), rtol=1e-6)


def test_adamw_without_decay_is_the_plain_adam_step():
    """Adam's first step is −lr·g/(|g| + eps) whatever θ: the registry's adamw adds no decay."""
    rng = np.random.default_rng(1)
    p = {"w": jnp.asarray(rng.normal(size=(3, 4)) * 10, jnp.float32)}
    g = {"w": jnp.asarray(rng.normal(size=(3, 4)), jnp.float32)}
    opt = get_optimizer("adamw", LR)
    u, _ = opt.update(g, opt.init(p), p)
    gw = np.asarray(g["w"], np.float64)
    np.testing.assert_allclose(np.asarray(u["w"]), -LR * gw / (np.abs(gw) + 1e-8), rtol=1e-5)


_MASKS = {
    "tree": {"dense": {"kernel": True, "bias": False}, "norm": {"scale": False}, "pair": (True, False)},
    "prefix": {"dense": True, "norm": False, "pair": (False, True)},
    "callable": lambda p: jax.tree.map(lambda x: x.ndim >= 2 and x.shape[0] != 2, p),
}


@pytest.mark.parametrize("mask_kind", list(_MASKS))
@pytest.mark.parametrize("name", [n for n in OPTIMIZERS if _has_decay(n)])
def test_mask_selects_the_decayed_parameters(name, mask_kind):
    """update(wd, mask) − update(wd=0) = −lr·wd·θ on the masked-in leaves, 0 on the others."""
    params, zo = _tree(), is_zeroth_order(name)
    mask = _MASKS[mask_kind]
    mask_tree = mask(params) if callable(mask) else mask
    flags = [bool(m) for m, sub in zip(jax.tree.leaves(mask_tree), jax.tree.structure(mask_tree).flatten_up_to(params))
             for _ in jax.tree.leaves(sub)]
    assert any(flags) and not all(flags)
    base = _first_update(get_optimizer(name, LR), params, zo)
    got = _first_update(get_optimizer(name, LR, weight_decay=WD, mask=mask), params, zo)
    every = _first_update(get_optimizer(name, LR, weight_decay=WD), params, zo)
    for b, g, e, p, f in zip(jax.tree.leaves(base), jax.tree.leaves(got), jax.tree.leaves(every),
                             jax.tree.leaves(params), flags):
        decay = -LR * WD * np.asarray(p, np.float64)
        np.testing.assert_allclose(np.asarray(g) - np.asarray(b), decay if f else 0.0, atol=1e-6)
        np.testing.assert_allclose(np.asarray(e) - np.asarray(b), decay, atol=1e-6)   # no mask: all decay


def test_mask_is_dropped_for_sm3_which_has_no_decay():
    params = _tree()
    got = _first_update(get_optimizer("sm3", LR, mask=default_decay_mask), params, False)
    want = _first_update(get_optimizer("sm3", LR), params, False)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("mask, match", [
    ({"dense": "yes"}, r"mask=\{'dense': 'yes'\} must be a pytree of Python bools"),
    (3, r"mask=3 must be a pytree of Python bools"),
])
def test_bad_mask_is_a_clear_error(mask, match):
    with pytest.raises(ValueError, match=match):
        get_optimizer("came", LR, weight_decay=WD, mask=mask)


def test_mask_laid_out_unlike_params_is_a_clear_error():
    opt = get_optimizer("adam_mini", LR, weight_decay=WD, mask={"a": True, "b": False})
    params = _tree()
    with pytest.raises(ValueError, match="mask must be a pytree of bools laid out like params"):
        opt.update(params, opt.init(params), params)


@pytest.mark.parametrize("scan", [False, True])
def test_default_decay_mask_on_a_transformer(scan):
    """Weight matrices decay; norm scales, biases and (unless asked) embeddings do not."""
    cfg = TransformerConfig(vocab_size=11, num_layers=2, embed_dim=8, num_heads=2, mlp_dim=16, scan_layers=scan)
    params = nnx.to_pure_dict(nnx.split(Transformer(cfg, rngs=nnx.Rngs(0)), nnx.Param, ...)[1])
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    for decay_embeddings in (False, True):
        mask = default_decay_mask(params, decay_embeddings=decay_embeddings)
        assert jax.tree.structure(mask) == jax.tree.structure(params)
        for (path, p), m in zip(flat, jax.tree.leaves(mask)):
            keys = [getattr(k, "key", getattr(k, "idx", None)) for k in path]
            if keys[-1] in ("scale", "bias"):
                want = False
            elif "embed" in keys:
                want = decay_embeddings
            else:
                want = keys[-1] == "kernel"
            assert m is want, (keys, p.shape, m)
    # seven kernels per block (q, k, v, out, wi, wg, wo; stacked once under scan) and lm_head
    assert sum(jax.tree.leaves(default_decay_mask(params))) == (7 if scan else 7 * 2) + 1


def test_default_decay_mask_by_rule():
    params = {"w": jnp.ones((3, 4)), "b": jnp.ones(4), "s": jnp.ones(()), "blk": {"bias": jnp.ones((2, 4)),
              "scale": jnp.ones((2, 4)), "kernel": jnp.ones((2, 4, 4))}, "pos_embed": {"kernel": jnp.ones((5, 4))},
              "held": (jnp.ones((4, 4)), jnp.ones(4)), "none": None}
    want = {"w": True, "b": False, "s": False, "blk": {"bias": False, "scale": False, "kernel": True},
            "pos_embed": {"kernel": False}, "held": (True, False), "none": None}
    assert default_decay_mask(params) == want
    assert default_decay_mask(params, decay_embeddings=True)["pos_embed"] == {"kernel": True}
    with pytest.raises(ValueError, match="decay_embeddings=1 must be a bool"):
        default_decay_mask(params, decay_embeddings=1)
