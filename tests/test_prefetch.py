"""Batches built ahead in background threads (``data.prefetch.Prefetch``, ``--prefetch``): the same
batches in the same order, built before they are asked for, errors at their own step, and a
training run whose every state and metric equals the run that builds each batch when its step
starts."""

import dataclasses
import json
import shutil
import threading

import jax
import numpy as np
import pytest

from sciscale_jax.data.prefetch import Prefetch
from sciscale_jax.recipes import get_recipe
from sciscale_jax.recipes.protein_mlm import ProteinMLMConfig
from sciscale_jax.train import TrainConfig, train


def _build(step):
    return {"x": np.random.default_rng([3, step]).normal(size=(4, 5))}


@pytest.mark.parametrize("depth", [0, 1, 3])
def test_the_batches_are_those_built_in_order(depth):
    with Prefetch(_build, 2, 9, depth) as batches:
        for step in range(2, 9):
            np.testing.assert_array_equal(batches(step)["x"], _build(step)["x"])


def test_batches_are_built_ahead_in_other_threads():
    built, threads = {}, set()
    ready = threading.Event()

    def build(step):
        threads.add(threading.current_thread().name)
        built[step] = True
        if len(built) == 3:
            ready.set()
        return step

    with Prefetch(build, 0, 100, 3) as batches:
        assert ready.wait(10), "three batches were not built before any was asked for"
        assert sorted(built) == [0, 1, 2]  # no further than the depth
        assert batches(0) == 0
        assert batches(1) == 1
    assert threading.current_thread().name not in threads
    assert all(name.startswith("sciscale-batches") for name in threads)
    assert max(built) <= 4  # after two asks: at most steps 3 and 4 more were started


def test_an_error_building_a_batch_is_raised_at_its_step():
    def build(step):
        if step == 3:
            raise ValueError("batch 3 is broken")
        return step

    with Prefetch(build, 0, 10, 2) as batches:
        assert [batches(s) for s in range(3)] == [0, 1, 2]  # built ahead of the broken one: unaffected
        with pytest.raises(ValueError, match="batch 3 is broken"):
            batches(3)


def test_asking_out_of_order_or_a_negative_depth_is_refused():
    with Prefetch(_build, 0, 10, 2) as batches:
        with pytest.raises(ValueError, match="batch of step 1 asked out of order"):
            batches(1)
    with pytest.raises(ValueError, match="prefetch depth=-1 must be an integer >= 0"):
        Prefetch(_build, 0, 10, -1)
    with pytest.raises(ValueError, match="prefetch=-2 must be >= 0"):
        TrainConfig(prefetch=-2)


def test_leaving_stops_building():
    built, release = [], threading.Event()

    def build(step):
        built.append(step)
        release.wait(10)
        return step

    batches = Prefetch(build, 0, 1000, 2)
    release.set()
    assert batches(0) == 0
    batches.close()
    count = len(built)
    assert count <= 4  # the depth, the one asked for and the one started after it
    assert len(built) == count  # nothing started after closing


MODEL = ProteinMLMConfig(vocab_size=32, num_layers=1, num_heads=2, embed_dim=32, mlp_dim=64, max_len=64)
CFG = TrainConfig(steps=5, batch_size=4, seq_len=32, save_every=3, eval_every=2, log_every=1, warmup_steps=2,
                  seed=2)


def test_a_run_with_prefetching_equals_one_without(tmp_path):
    recipe = get_recipe("protein-mlm")
    runs = {}
    for depth in (0, 3):
        out = tmp_path / f"run{depth}"
        result = train(recipe, MODEL, dataclasses.replace(CFG, prefetch=depth), out, progress=False,
                       log=lambda *_: None)
        lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        runs[depth] = result["state"], [{k: v for k, v in m.items() if k != "time"} for m in lines]
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), runs[0][0], runs[3][0])
    assert runs[0][1] == runs[3][1] and len(runs[0][1]) >= 5
    # resumed from checkpoint 3 with batches built ahead from step 3 on: the same final state
    shutil.copytree(tmp_path / "run0", tmp_path / "again")
    shutil.rmtree(tmp_path / "again" / "checkpoints" / "5")
    more = train(recipe, MODEL, dataclasses.replace(CFG, prefetch=2), tmp_path / "again", resume=True,
                 progress=False, log=lambda *_: None)
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), more["state"], runs[0][0])
