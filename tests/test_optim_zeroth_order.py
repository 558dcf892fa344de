"""MeZO, ZO-AdaMU and DeepZero against their equations in NumPy float64 and against jax.grad."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from sciscale_jax.optim import deepzero, mezo, state_bytes, zo_adamu, zo_grasp_densities
from sciscale_jax.optim.deepzero import kept_counts, mask_indices, zo_grasp_scores
from sciscale_jax.optim.mezo import gaussian_like as _gaussian_like

gaussian_like = jax.jit(_gaussian_like)   # the same draws; jitted so the references run fast

SHAPES = {"mat": (4, 5), "t3": (2, 3, 4), "vec": (5,), "scalar": ()}
STEPS = 10


def _problem(seed=0):
    rng = np.random.default_rng(seed)
    a = {k: rng.uniform(0.5, 2.0, s) for k, s in SHAPES.items()}
    c = {k: rng.normal(size=s) for k, s in SHAPES.items()}
    p0 = {k: rng.normal(size=s).astype(np.float32) for k, s in SHAPES.items()}

    def loss(p, xp=jnp):   # a smooth non-quadratic loss, written once for jnp and numpy
        return sum(xp.sum(0.5 * a[k] * (p[k] - c[k]) ** 2 + 0.1 * xp.sin(p[k])) for k in SHAPES)
    return p0, loss


def _np(tree):
    return {k: np.asarray(v, np.float64) for k, v in tree.items()}


def _run_zo(opt, p0, loss, steps=STEPS, jit=True):
    p = jax.tree.map(jnp.asarray, p0)
    state = opt.init(p)
    upd = (jax.jit(lambda s, q: opt.update(None, s, q, value_fn=loss)) if jit
           else (lambda s, q: opt.update(None, s, q, value_fn=loss)))
    for _ in range(steps):
        u, state = upd(state, p)
        p = optax.apply_updates(p, u)
    return p, state


# ------------------------------------------------------------------------------- MeZO

def _mezo_ref(p0, loss, lr, eps, n, wd, seed, steps=STEPS):
    p = _np(p0)
    for t in range(steps):
        key = jax.random.fold_in(jax.random.PRNGKey(seed), t)
        zs = [_np(gaussian_like(jax.random.fold_in(key, s), p0)) for s in range(n)]
        proj = [(loss({k: p[k] + eps * z[k] for k in p}, np) - loss({k: p[k] - eps * z[k] for k in p}, np))
                / (2 * eps) for z in zs]
        p = {k: p[k] - lr * (sum(pr * z[k] for pr, z in zip(proj, zs)) / n + wd * p[k]) for k in p}
    return p


def test_mezo_matches_numpy_equations(n=3, wd=0.1):
    p0, loss = _problem()
    got, state = _run_zo(mezo(1e-2, eps=1e-2, num_samples=n, weight_decay=wd, seed=7), p0, loss)
    want = _mezo_ref(p0, loss, 1e-2, 1e-2, n, wd, seed=7)
    for k in SHAPES:
        np.testing.assert_allclose(np.asarray(got[k]), want[k], rtol=1e-4, atol=1e-4, err_msg=k)
    assert state_bytes(state) == 2 * 4 + 4   # a uint32[2] key and an int32 count: nothing parameter-sized


def test_mezo_estimator_matches_grad_and_error_shrinks_like_inverse_sqrt_samples():
    rng = np.random.default_rng(1)
    d = 8
    m = rng.normal(size=(d, d))
    a = jnp.asarray(m @ m.T / d + np.eye(d), jnp.float32)
    b = jnp.asarray(rng.normal(size=d), jnp.float32)
    theta = jnp.asarray(rng.normal(size=d), jnp.float32)
    f = lambda th: 0.5 * th @ a @ th + b @ th  # noqa: E731
    g = np.asarray(jax.grad(f)(theta), np.float64)
    reps = 256
    rms = {}
    for n in (2, 8, 32):
        opt = mezo(1.0, eps=1e-2, num_samples=n)
        keys = jax.vmap(jax.random.PRNGKey)(jnp.arange(reps))
        est = jax.jit(jax.vmap(lambda k: -opt.update(None, opt.init(theta)._replace(key=k), theta, value_fn=f)[0]))(keys)
        est = np.asarray(est, np.float64)
        err2 = np.sum((est - g) ** 2, axis=1)
        rms[n] = np.sqrt(err2.mean())
        theory = np.sqrt((d + 1) * g @ g / n)        # Gaussian SPSA: E|ĝ − g|² = (d + 1)|g|² / n
        assert 0.75 * theory <= rms[n] <= 1.25 * theory, (n, rms[n], theory)
        # the mean over keys is unbiased: within 4 standard errors of jax.grad
        assert np.linalg.norm(est.mean(0) - g) <= 4 * theory / np.sqrt(reps)
    assert 0.2 <= rms[32] / rms[2] <= 0.3          # 1/sqrt(16) = 0.25


# --------------------------------------------------------------------------- ZO-AdaMU

def _progress(t, t1, t2):
    if t < t1:
        return 0.0
    if t >= t2:
        return 1.0
    return 0.5 * (1 - np.cos(np.pi * (t - t1) / (t2 - t1)))


def _zo_adamu_ref(p0, loss, lr, eps, alpha, b1, b2, t1, t2, sigma, wd, seed, steps):
    p = _np(p0)
    m = {k: np.zeros_like(v) for k, v in p.items()}
    for t in range(steps):
        s = _progress(t, t1, t2)
        al, be1, be2 = 1 - s * (1 - alpha), 1 - s * (1 - b1), 1 - s * (1 - b2)
        key = jax.random.fold_in(jax.random.PRNGKey(seed), t)
        n0 = _np(gaussian_like(jax.random.fold_in(key, 0), p0))
        n1 = _np(gaussian_like(jax.random.fold_in(key, 1), p0))
        zd = {k: np.sqrt(al) * n0[k] for k in p}                  # ż ~ N(0, α)
        zdd = {k: m[k] + np.sqrt(1 - al) * n1[k] for k in p}      # z̈ ~ N(m_t, 1 − α)
        m = {k: be1 * zd[k] + (1 - be1) * zdd[k] for k in p}
        v = {k: be2 * zd[k] ** 2 + (1 - be2) * zdd[k] ** 2 for k in p}
        proj = (loss({k: p[k] + eps * m[k] for k in p}, np) - loss({k: p[k] - eps * m[k] for k in p}, np)) / (2 * eps)
        p = {k: p[k] - lr * (proj * m[k] / np.sqrt(v[k] + sigma) + wd * p[k]) for k in p}
    return p


def test_zo_adamu_matches_numpy_equations_through_all_anneal_phases():
    p0, loss = _problem(2)
    kw = dict(eps=1e-2, alpha=0.4, b1=0.7, b2=0.8, anneal_steps=(3, 9), sigma=1e-8, weight_decay=0.05, seed=3)
    got, state = _run_zo(zo_adamu(2e-3, **kw), p0, loss, steps=12)
    want = _zo_adamu_ref(p0, loss, 2e-3, 1e-2, 0.4, 0.7, 0.8, 3, 9, 1e-8, 0.05, 3, 12)
    for k in SHAPES:
        np.testing.assert_allclose(np.asarray(got[k]), want[k], rtol=1e-4, atol=1e-4, err_msg=k)
    assert int(state.count) == 12


# --------------------------------------------------------------------------- DeepZero

def test_deepzero_matches_numpy_forward_differences_over_sparse_masks():
    p0, loss = _problem(4)
    dens = {"mat": 0.3, "t3": 0.25, "vec": 0.6, "scalar": 1.0}
    K, mu, lr, mom, wd = 3, 1e-2, 1e-2, 0.5, 0.05
    opt = deepzero(lr, mu=mu, reshuffle_every=K, chunk_size=4, momentum=mom, weight_decay=wd, seed=5,
                   layer_density=dens)
    got, _ = _run_zo(opt, p0, loss, steps=STEPS)
    kept = kept_counts(p0, layer_density=dens)
    assert kept == [6, 1, 6, 3]      # leaves in key order: mat 20·0.3, scalar, t3 24·0.25, vec 5·0.6
    p = _np(p0)
    buf = {k: np.zeros_like(v) for k, v in p.items()}
    names = sorted(SHAPES)
    masks = jax.jit(lambda t: mask_indices(jax.random.PRNGKey(5), t, p0, kept, K))
    for t in range(STEPS):
        idx = [np.asarray(i) for i in masks(t)]
        base = loss(p, np)
        g = {}
        for k, ii in zip(names, idx):
            flat = np.zeros(p[k].size)
            for i in ii:
                moved = dict(p)
                e = np.zeros(p[k].size)
                e[i] = mu
                moved[k] = p[k] + e.reshape(p[k].shape)
                flat[i] = (loss(moved, np) - base) / mu
            g[k] = flat.reshape(p[k].shape)
        buf = {k: mom * buf[k] + g[k] for k in p}
        p = {k: p[k] - lr * (buf[k] + wd * p[k]) for k in p}
    for k in SHAPES:
        np.testing.assert_allclose(np.asarray(got[k]), p[k], rtol=1e-3, atol=1e-4, err_msg=k)


def test_deepzero_masks_reshuffle_every_k_steps_and_jit_agrees():
    p0, loss = _problem(5)
    opt = deepzero(1.0, density=0.2, reshuffle_every=2, chunk_size=3, seed=1)
    p = jax.tree.map(jnp.asarray, p0)
    state = opt.init(p)
    supports = []
    upd = jax.jit(lambda s, q: opt.update(None, s, q, value_fn=loss))
    for _ in range(4):
        u, state2 = upd(state, p)
        supports.append(np.concatenate([np.asarray(u[k]).reshape(-1) != 0 for k in sorted(SHAPES)]))
        state = state2                     # params held fixed: only the mask moves
    assert [int(s.sum()) for s in supports] == [sum(kept_counts(p0, 0.2))] * 4
    assert (supports[0] == supports[1]).all() and (supports[2] == supports[3]).all()
    assert not (supports[1] == supports[2]).all()


def test_deepzero_eager_equals_jit():
    rng = np.random.default_rng(8)
    p = {"v": jnp.asarray(rng.normal(size=7), jnp.float32)}
    loss = lambda q: jnp.sum(jnp.cos(q["v"]) + q["v"] ** 2)  # noqa: E731
    opt = deepzero(1.0, density=0.5, chunk_size=2, momentum=0.5)
    state = opt.init(p)
    for _ in range(2):
        u, _ = opt.update(None, state, p, value_fn=loss)
        uj, state = jax.jit(lambda s, q: opt.update(None, s, q, value_fn=loss))(state, p)
        # forward differences amplify float32 rounding of the loss (~1e-7·|L|/mu)
        np.testing.assert_allclose(np.asarray(u["v"]), np.asarray(uj["v"]), rtol=0, atol=2e-3)
        p = optax.apply_updates(p, uj)


def test_zo_grasp_scores_match_exact_and_densities_keep_lowest_scores():
    rng = np.random.default_rng(6)
    d = 10
    m = rng.normal(size=(d, d))
    h = m @ m.T / d + np.eye(d)
    params = {"w": jnp.asarray(rng.normal(size=(2, 5)), jnp.float32), "s": jnp.float32(0.7)}
    hj = jnp.asarray(h, jnp.float32)
    f = lambda p: 0.5 * _flat_all(p)[:d] @ hj @ _flat_all(p)[:d] + jnp.sum(p["w"][:, -1] ** 3)  # noqa: E731
    scores = zo_grasp_scores(f, params, jax.random.PRNGKey(0), num_samples=3000, mu=1e-3, delta=1e-2)
    # exact −θ ⊙ Hg in float64 from jax.hessian / jax.grad
    hess = np.asarray(jax.hessian(lambda x: f(_unflat(x)))(_flat_all(params)), np.float64)
    g = np.asarray(jax.grad(lambda x: f(_unflat(x)))(_flat_all(params)), np.float64)
    exact = -np.asarray(_flat_all(params), np.float64) * (np.asarray(hess) @ g)
    got = np.asarray(_flat_all(scores), np.float64)
    assert np.linalg.norm(got - exact) <= 0.2 * np.linalg.norm(exact), (got, exact)
    dens = zo_grasp_densities(f, params, 0.5, key=jax.random.PRNGKey(0), num_samples=64)
    sc = zo_grasp_scores(f, params, jax.random.PRNGKey(0), num_samples=64)
    allsc = np.concatenate([np.asarray(sc["s"]).reshape(-1), np.asarray(sc["w"]).reshape(-1)])
    keep = int(round(0.5 * allsc.size))                 # 0.5 of all 11 coordinates
    thr = np.sort(allsc)[keep - 1]
    assert dens["w"] == pytest.approx(np.sum(np.asarray(sc["w"]) <= thr) / 10)
    assert dens["s"] == pytest.approx(max(1, np.sum(np.asarray(sc["s"]) <= thr)) / 1)


def _flat_all(p):
    return jnp.concatenate([p["s"].reshape(1), p["w"].reshape(-1)])


def _unflat(x):
    return {"s": x[0], "w": x[1:].reshape(2, 5)}


# ------------------------------------------------------------- chains, schedules, errors

@pytest.mark.parametrize("make", [
    pytest.param(lambda lr: mezo(lr, eps=1e-2, seed=2), id="mezo"),
    pytest.param(lambda lr: zo_adamu(lr, eps=1e-2, anneal_steps=(1, 3)), id="zo_adamu", marks=pytest.mark.slow),
    pytest.param(lambda lr: deepzero(lr, density=0.3, chunk_size=4), id="deepzero", marks=pytest.mark.slow)])
def test_zeroth_order_inside_chain_with_schedule(make):
    p0, loss = _problem(7)
    sched = optax.linear_schedule(1e-2, 1e-3, 2)
    chained, _ = _run_zo(optax.chain(make(sched), optax.identity()), p0, loss, steps=3)
    p = jax.tree.map(jnp.asarray, p0)
    opt = make(1.0)
    state = opt.init(p)
    upd = jax.jit(lambda s, q: opt.update(None, s, q, value_fn=loss))
    for t in range(3):
        u, state = upd(state, p)
        p = optax.apply_updates(p, jax.tree.map(lambda x: x * sched(t), u))
    for k in SHAPES:
        np.testing.assert_allclose(np.asarray(chained[k]), np.asarray(p[k]), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("make,match", [
    (lambda: mezo(-1.0), "learning_rate=-1.0"), (lambda: mezo(1e-3, eps=-1e-3), "eps=-0.001"),
    (lambda: mezo(1e-3, num_samples=0), "num_samples=0"), (lambda: zo_adamu(1e-3, b1=1.5), "b1=1.5"),
    (lambda: zo_adamu(1e-3, anneal_steps=(5, 2)), r"anneal_steps=\(5, 2\)"),
    (lambda: deepzero(1e-3, density=0.0), "density=0.0"), (lambda: deepzero(1e-3, reshuffle_every=0), "reshuffle_every=0"),
    (lambda: deepzero(1e-3, momentum=1.0), "momentum=1.0")])
def test_zeroth_order_bad_input(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_zeroth_order_needs_value_fn():
    opt = mezo(1e-3)
    p = {"w": jnp.ones(3)}
    with pytest.raises(ValueError, match="value_fn"):
        opt.update(None, opt.init(p), p)
