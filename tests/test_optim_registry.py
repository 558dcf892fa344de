"""Optimizer registry, state accounting, bad-input errors, and the no-flax rule for sciscale_jax.optim."""

import inspect
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from sciscale_jax.optim import (OPTIMIZERS, adam_mini, adamw_8bit, came, format_report, get_optimizer,
                                is_zeroth_order, mezo, registry, sm3, state_bytes, state_report)


def test_registry_names_and_kinds():
    assert OPTIMIZERS == ("adamw", "adafactor", "sm3", "came", "lion", "adam_mini", "adamw_8bit",
                          "mezo", "zo_adamu", "deepzero")
    assert [n for n in OPTIMIZERS if is_zeroth_order(n)] == ["mezo", "zo_adamu", "deepzero"]
    with pytest.raises(ValueError, match="unknown optimizer 'adam'.*adamw, adafactor, sm3"):
        get_optimizer("adam", 1e-3)
    with pytest.raises(ValueError, match="unknown optimizer"):
        is_zeroth_order("sgd")
    with pytest.raises(ValueError, match="learning_rate=-0.1"):
        get_optimizer("lion", -0.1)


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_every_registered_optimizer_lowers_a_quadratic(name):
    rng = np.random.default_rng(0)
    target = {"w": jnp.asarray(rng.normal(size=(3, 5)), jnp.float32), "s": jnp.float32(0.3)}
    loss = lambda p: sum(jnp.sum((p[k] - target[k]) ** 2) for k in p)  # noqa: E731
    params = {"w": jnp.asarray(rng.normal(size=(3, 5)), jnp.float32), "s": jnp.float32(-1.2)}
    lr = {"zo_adamu": 0.01}.get(name, 0.05)   # its sign-like step scales with |projected grad|
    opt = get_optimizer(name, optax.constant_schedule(lr))
    zo = is_zeroth_order(name)

    @jax.jit
    def run(p):
        def step(carry, _):
            p, st = carry
            if zo:
                u, st = opt.update(None, st, p, value_fn=loss)
            else:
                u, st = opt.update(jax.grad(loss)(p), st, p)
            return (optax.apply_updates(p, u), st), None
        return jax.lax.scan(step, (p, opt.init(p)), None, length=20)[0][0]
    assert isinstance(opt, optax.GradientTransformationExtraArgs) or not zo
    assert float(loss(run(params))) < 0.9 * float(loss(params))


def test_state_bytes_counts_by_hand():
    w = jax.ShapeDtypeStruct((30, 40), jnp.float32)
    b = jax.ShapeDtypeStruct((7,), jnp.bfloat16)
    tree = {"w": w, "b": b}
    assert state_bytes(jax.eval_shape(optax.adamw(1e-3).init, tree)) == 4 + 2 * (1200 * 4 + 7 * 2)
    # CAME: first moment + (row, col) for v and for the confidence term; vector: mu + nu (float32 state)
    assert state_bytes(jax.eval_shape(came(1e-3).init, tree)) == 4 + 1200 * 4 + 2 * (30 + 40) * 4 + 2 * 7 * 4
    # 8-bit: 1200 uint8 codes and a float32 absmax per block of the last axis (30 rows of one block of
    # 40), per moment
    assert state_bytes(jax.eval_shape(adamw_8bit(1e-3, min_8bit_size=1000).init, tree)) == \
        4 + 2 * (1200 + 30 * 4) + 2 * 7 * 4
    assert state_bytes(jax.eval_shape(mezo(1e-3).init, tree)) == 8 + 4


def test_state_report_per_parameter_rows():
    params = [jnp.ones((30, 40)), jnp.ones((6,))]
    rows = state_report(optax.chain(optax.clip_by_global_norm(1.0), came(1e-3)).init(params), params)
    by = {r["param"]: r for r in rows}
    assert by["0"]["state_bytes"] == 1200 * 4 + 2 * (30 + 40) * 4
    assert by["1"]["state_bytes"] == 2 * 6 * 4 and by["1"]["ratio"] == 2.0
    assert by["(shared)"]["state_bytes"] == 4            # the step count, not charged to a parameter
    assert sum(r["state_bytes"] for r in rows) == state_bytes(optax.chain(optax.clip_by_global_norm(1.0),
                                                                            came(1e-3)).init(params))
    table = format_report(rows)
    assert table.splitlines()[0].startswith("| parameter") and "| (30, 40) |" in table


@pytest.mark.parametrize("make,match", [
    (lambda: came(-1e-3), "learning_rate=-0.001"), (lambda: came(1e-3, eps1=-1.0), "eps1=-1.0"),
    (lambda: came(1e-3, b3=1.0), r"b3=1.0 must lie in \[0, 1\)"), (lambda: came(1e-3, clip_threshold=0.0), "clip_threshold=0.0"),
    (lambda: adam_mini(1e-3, b1=-0.1), "b1=-0.1"), (lambda: adam_mini(1e-3, eps=-1e-8), "eps=-1e-08"),
    (lambda: adam_mini(1e-3, partition="heads"), "partition='heads'"),
    (lambda: sm3(1e-3, b1=1.0), "b1=1.0"), (lambda: sm3(1e-3, b2=1.5), r"b2=1.5 must lie in \[0, 1\]"),
    (lambda: sm3(1e-3, eps=-1.0), "eps=-1.0"), (lambda: adamw_8bit(1e-3, block_size=0), "block_size=0"),
    (lambda: came("fast"), "learning_rate='fast'")])
def test_bad_input_names_the_value(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_weight_decay_without_params_is_a_clear_error():
    opt = came(1e-3, weight_decay=0.1)
    g = {"w": jnp.ones((2, 3))}
    with pytest.raises(ValueError, match="needs `params`"):
        opt.update(g, opt.init(g))


def test_optim_never_imports_flax():
    code = "import sys, sciscale_jax.optim; assert 'flax' not in sys.modules, 'flax imported'"
    subprocess.run([sys.executable, "-c", code], check=True, env={"JAX_PLATFORMS": "cpu", "PATH": ""})


_BAD_LRS = [float("nan"), float("inf"), -float("inf"), 0.0, -1e-3, np.float32("nan"), "fast", None, True]


@pytest.mark.parametrize("bad", _BAD_LRS, ids=repr)
@pytest.mark.parametrize("name", OPTIMIZERS)
def test_bad_learning_rate_is_refused(name, bad):
    """Non-finite, non-positive and non-numeric learning rates fail in one line naming the value."""
    for build in (lambda: get_optimizer(name, bad), lambda: registry.factory(name)(bad)):
        with pytest.raises(ValueError, match=re.escape(f"learning_rate={bad!r}")) as err:
            build()
        assert "\n" not in str(err.value)
    assert get_optimizer(name, optax.constant_schedule(1e-3)) is not None   # a schedule is fine


def _float_args(name):
    """The factory's float-valued keyword arguments (betas, eps, decay, ...) with their defaults."""
    return [n for n, p in inspect.signature(registry.factory(name)).parameters.items()
            if isinstance(p.default, float) and not isinstance(p.default, bool)]


_FLOAT_CASES = [(name, arg) for name in OPTIMIZERS for arg in _float_args(name)]


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")], ids=repr)
@pytest.mark.parametrize("name, arg", _FLOAT_CASES, ids=[f"{n}-{a}" for n, a in _FLOAT_CASES])
def test_non_finite_hyperparameter_is_refused(name, arg, bad):
    with pytest.raises(ValueError, match=re.escape(f"{arg}={bad!r}")) as err:
        get_optimizer(name, 1e-3, **{arg: bad})
    assert "\n" not in str(err.value)


def test_every_optimizer_checks_its_float_arguments():
    """The sweep above covers betas, eps and decay of every optimizer that has them."""
    assert len(_FLOAT_CASES) >= 30
    for name in OPTIMIZERS:
        assert name == "sm3" or "weight_decay" in _float_args(name)


@pytest.mark.parametrize("make, match", [
    (lambda: came(float("inf")), "learning_rate=inf"),
    (lambda: adamw_8bit(1e-3, block_size=2.5), "block_size=2.5"),
    (lambda: mezo(1e-3, num_samples=0), "num_samples=0"),
    (lambda: get_optimizer("deepzero", 1e-3, density=0.0), "density=0.0"),
    (lambda: get_optimizer("deepzero", 1e-3, chunk_size=True), "chunk_size=True"),
    (lambda: get_optimizer("adafactor", 1e-3, momentum=1.0), "momentum=1.0"),
    (lambda: get_optimizer("adafactor", 1e-3, clipping_threshold=0.0), "clipping_threshold=0.0"),
    (lambda: get_optimizer("lion", 1e-3, b2=1.5), "b2=1.5"),
    (lambda: get_optimizer("adamw", 1e-3, weight_decay=-0.1), "weight_decay=-0.1"),
    (lambda: get_optimizer("zo_adamu", 1e-3, anneal_steps=(5, 2)), "anneal_steps=(5, 2)"),
    (lambda: get_optimizer("came", jnp.float32(jnp.inf)), "learning_rate="),
])
def test_more_bad_arguments(make, match):
    with pytest.raises(ValueError, match=re.escape(match)):
        make()
    assert get_optimizer("came", jnp.float32(1e-3)) is not None and get_optimizer("came", np.float64(1e-3)) is not None
