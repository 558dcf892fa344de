"""Pipeline schedule tables: dependencies, bubble fractions against the textbook formulas,
stash bounds, and errors for bad arguments (pure Python, fast)."""

import pytest

from sciscale_jax.parallel.pipeline_schedule import (Action, Schedule, analytic_bubble, make_schedule,
                                                     validate)

CASES = [("gpipe", 1), ("1f1b", 1), ("interleaved", 2), ("zbh1", 1)]


def _check_by_hand(s: Schedule):
    """Dependencies and one-action-per-kind re-derived here, independently of ``validate``."""
    p, S = s.num_stages, s.num_stages * s.virtual_stages
    when = {}
    for t, row in enumerate(s.table):
        for d, a in enumerate(row):
            if a is not None:
                assert (a.kind, a.mb, a.chunk * p + d) not in when
                when[(a.kind, a.mb, a.chunk * p + d)] = t
    kinds = "FBW" if s.split_backward else "FB"
    assert len(when) == len(kinds) * s.num_microbatches * S
    for mb in range(s.num_microbatches):
        for st in range(S):
            if st:
                assert when["F", mb, st] >= when["F", mb, st - 1] + 1   # activation hop
            if st < S - 1:
                assert when["B", mb, st] >= when["B", mb, st + 1] + 1   # cotangent hop
            assert when["B", mb, st] > when["F", mb, st]
            if s.split_backward:
                assert when["W", mb, st] > when["B", mb, st]


@pytest.mark.parametrize("name,v", CASES)
@pytest.mark.parametrize("p", [2, 4, 8])
@pytest.mark.parametrize("m", [3, 4, 8, 16])
def test_tables_are_valid(name, v, p, m):
    if name == "interleaved" and m % p:
        pytest.skip("interleaved needs m % p == 0")
    s = make_schedule(name, p, m, v)
    validate(s)
    _check_by_hand(s)


def test_gpipe_p2_m2_literal_table():
    F, B = (lambda mb: Action("F", mb, 0)), (lambda mb: Action("B", mb, 0))
    expected = ((F(0), None), (F(1), F(0)), (None, F(1)), (None, B(0)), (B(0), B(1)), (B(1), None))
    assert make_schedule("gpipe", 2, 2).table == expected


@pytest.mark.parametrize("p", [2, 4, 8])
@pytest.mark.parametrize("m", [4, 5, 8, 16])
def test_bubble_gpipe_1f1b_interleaved_match_formula(p, m):
    for name, v in CASES[:3]:
        if name == "interleaved" and m % p:
            continue
        formula = (p - 1) / (m + p - 1) if v == 1 else (p - 1) / (v * m + p - 1)
        assert make_schedule(name, p, m, v).bubble_fraction() == pytest.approx(formula, rel=1e-12)
        assert analytic_bubble(name, p, m, v) == pytest.approx(formula, rel=1e-12)


@pytest.mark.parametrize("p,m", [(2, 8), (4, 8), (4, 16), (8, 16)])
def test_zbh1_bubble_about_a_third_of_1f1b(p, m):
    zb = make_schedule("zbh1", p, m)
    # in units of one F: 1F1B's bubble is 3(p - 1) (B + W = 2 units), ZB-H1 aims at p - 1
    idle_zb = zb.bubble_fraction() * zb.num_ticks
    assert zb.num_ticks == 3 * m + p - 1
    assert idle_zb == pytest.approx(p - 1)
    assert zb.bubble_fraction() == pytest.approx((p - 1) / (3 * m + p - 1))
    assert idle_zb / (3 * (p - 1)) == pytest.approx(1 / 3)


def test_stash_flat_in_m_for_1f1b_and_zbh1_growing_for_gpipe():
    for p in (2, 4):
        slots = {name: [make_schedule(name, p, m).stash()[2] for m in (4, 8, 16)] for name in ("gpipe", "1f1b", "zbh1")}
        assert slots["gpipe"] == [4, 8, 16]
        assert slots["1f1b"] == [p] * 3 and slots["zbh1"] == [p] * 3
        for name in ("1f1b", "zbh1"):
            s = make_schedule(name, p, 16)
            assert max(s.max_in_flight()) == p
        assert make_schedule("1f1b", p, 16).max_in_flight() == [p - d for d in range(p)]


def test_stash_slots_never_overlap():
    for name, v in CASES:
        s = make_schedule(name, 4, 8, v)
        act, cot, na, nc = s.stash()
        ticks = s.ticks_of()
        use = "W" if s.split_backward else "B"
        for slots, n, start in ((act, na, lambda mb, st: ticks["F", mb, st - 1] + 1),
                                (cot, nc, lambda mb, st: ticks["B", mb, st + 1] + 1)):
            held = {}
            for (mb, st), slot in slots.items():
                assert 0 <= slot < n
                for t in range(start(mb, st), ticks[use, mb, st] + 1):
                    key = (st % 4, slot, t)
                    assert key not in held, (name, key)
                    held[key] = (mb, st)


def test_validate_rejects_broken_tables():
    good = make_schedule("1f1b", 2, 2)
    rows = [list(r) for r in good.table]
    # stage 1 forward in the same tick as stage 0: no tick for the ppermute
    bad = [[Action("F", 0, 0), Action("F", 0, 0)]] + [r for r in rows[2:]] + [[Action("F", 1, 0), None]]
    with pytest.raises(ValueError):
        validate(Schedule("x", 2, 2, 1, False, tuple(map(tuple, bad))))
    with pytest.raises(ValueError, match="missing"):
        validate(Schedule("x", 2, 2, 1, False, good.table[:-1]))
    with pytest.raises(ValueError, match="twice"):
        validate(Schedule("x", 2, 2, 1, False, good.table + (good.table[-1],)))


@pytest.mark.parametrize("args,match", [
    (("zb", 2, 4), "unknown pipeline schedule 'zb'"),
    (("interleaved", 4, 6, 2), "microbatches=6, stages=4"),
    (("1f1b", 4, 8, 2), "virtual_stages=2 needs schedule 'interleaved'"),
    (("1f1b", 0, 8), "pipeline stages=0"),
    (("gpipe", 2, 0), "microbatches=0"),
])
def test_bad_arguments(args, match):
    with pytest.raises(ValueError, match=match):
        make_schedule(*args)
