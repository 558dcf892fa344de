"""Adapters-only checkpoints: a LoRA run started from ``--init-from`` writes its adapters and
optimizer state, not the frozen base it reads again from where it started.

The references are independent of the code under test: the arrays a checkpoint holds as Orbax's
own metadata lists them against a run that writes everything (``save_frozen``), a resumed run
against an uninterrupted one bit for bit, a loaded model's
frozen weights against the base run's as loaded plainly, and the fingerprint against one
flipped bit and one swap of two elements on any sharding.
"""

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx, traverse_util

from sciscale_jax import cli
from sciscale_jax.models.stack import is_lora
from sciscale_jax.parallel import ParallelConfig, make_mesh
from sciscale_jax.recipes import get_recipe, load_run
from sciscale_jax.train import TrainConfig, train
from sciscale_jax.train.checkpoint import _saved_signature, fingerprint

RECIPE = get_recipe("protein-mlm")
MODEL = RECIPE.make_config(num_layers=2, num_heads=2, embed_dim=32, mlp_dim=64, max_len=64)
QUIET = dict(progress=False, log=lambda *_: None)
BASE = dict(batch_size=8, seq_len=32, eval_every=100, log_every=1, warmup_steps=1, learning_rate=1e-2)


def _lora(quant="none", rank=4):
    return RECIPE.make_config(**{**MODEL.to_dict(), "lora_rank": rank, "lora_targets": "all", "lora_quant": quant})


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    run = tmp_path_factory.mktemp("adapters") / "pretrained"
    train(RECIPE, MODEL, TrainConfig(steps=3, save_every=3, seed=1, **BASE), run, **QUIET)
    return run


def _params(run, **kw) -> dict:
    return traverse_util.flatten_dict(jax.tree.map(np.asarray, nnx.to_pure_dict(
        nnx.state(load_run(run, log=lambda *_: None, **kw).model, nnx.Param))))


def _saved_params(run, step) -> set:
    """The parameter names checkpoint ``step`` of ``run`` holds, by Orbax's metadata."""
    return {name.split("/", 1)[1] for name in _saved_signature(run / "checkpoints" / str(step))
            if name.startswith("params/")}


def _first_loss(run) -> float:
    return next(json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()
                if json.loads(line).get("step") == 1 and "loss" in json.loads(line))


def test_the_fingerprint_sees_one_bit_and_not_the_sharding():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(8, 16)).astype(np.float32)
    x[0, 0] = 0.0
    tree = {"w": jnp.asarray(x), "h": jnp.asarray(x[:4, :8], jnp.bfloat16),
            "q": jnp.asarray(rng.integers(-128, 127, (8, 4)), jnp.int8), "m": jnp.asarray(x > 0)}
    digest = fingerprint(tree)
    mesh = make_mesh(ParallelConfig(data=2, fsdp=4))
    spread = {k: jax.device_put(v, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data", "fsdp")))
              for k, v in tree.items()}
    assert fingerprint(spread) == digest
    flipped = x.copy()
    flipped[0, 0] = -0.0  # equal as a number, one bit apart
    swapped = x.copy()
    swapped[[1, 2], 3] = swapped[[2, 1], 3]
    for changed in (flipped, swapped):
        assert fingerprint({**tree, "w": jnp.asarray(changed)}) != digest
    assert fingerprint({**tree, "w": jnp.asarray(x.reshape(16, 8))}) != digest


@pytest.mark.parametrize("quant", ["none", "nf4-dq"])
def test_a_lora_run_checkpoints_its_adapters_alone_and_resumes_exactly(pretrained, tmp_path, quant):
    model = _lora(quant)
    cfg = lambda **kw: TrainConfig(save_every=2, seed=7, init_from=str(pretrained), schedule_steps=4,  # noqa: E731
                                   **BASE, **kw)
    train(RECIPE, model, cfg(steps=2), tmp_path / "lean", **QUIET)
    resumed = train(RECIPE, model, cfg(steps=4), tmp_path / "lean", resume=True, **QUIET)
    whole = train(RECIPE, model, cfg(steps=4, save_frozen=True), tmp_path / "whole", **QUIET)
    saved = json.loads((tmp_path / "lean" / "run_config.json").read_text())
    assert set(saved["frozen_weights"]) == {"fingerprint"}
    assert "frozen_weights" not in json.loads((tmp_path / "whole" / "run_config.json").read_text())
    # What each checkpoint holds: adapters (and double-quantised scales) against every parameter.
    lean, everything = _saved_params(tmp_path / "lean", 4), _saved_params(tmp_path / "whole", 4)
    kept = {n for n in everything if n.split("/")[-1] in ("lora_a", "lora_b", "kernel_absmax_q", "kernel_absmax_dq")}
    assert lean == kept and len(everything) > len(kept) and any(n.endswith("lora_b") for n in lean)
    # (Bytes on disk are no test at this size: a checkpoint folder of this tiny model varied by over
    # 100 kB between runs of the same settings, more than its frozen weights' 91 kB.)
    # Two steps, a resume and two more equal four steps bit for bit, frozen weights included.
    a, b = _params(tmp_path / "lean"), _params(tmp_path / "whole")
    assert a.keys() == b.keys() and all(np.array_equal(a[p], b[p]) for p in a)
    assert resumed["val_loss"] == whole["val_loss"]
    if quant == "none":  # every frozen weight is the pretrained one, read again bit for bit
        start = _params(pretrained)
        assert all(np.array_equal(a[p], start[p]) for p in a if not is_lora(p))


def test_an_adapters_only_run_resumes_onto_another_mesh(pretrained, tmp_path):
    model = _lora("nf4-dq")
    cfg = lambda **kw: TrainConfig(save_every=2, seed=7, init_from=str(pretrained), schedule_steps=4,  # noqa: E731
                                   **BASE, **kw)
    train(RECIPE, model, cfg(steps=2), tmp_path / "moved", **QUIET)
    train(RECIPE, model, cfg(steps=4, mesh="data=2,fsdp=2,tensor=2", zero=3), tmp_path / "moved", resume=True,
          **QUIET)
    train(RECIPE, model, cfg(steps=4), tmp_path / "one", **QUIET)
    moved, one = _params(tmp_path / "moved"), _params(tmp_path / "one")
    for path in one:
        if is_lora(path):
            np.testing.assert_allclose(moved[path], one[path], atol=2e-5, rtol=2e-5, err_msg=str(path))
        else:  # 4-bit codes and scales as the run first stored them
            np.testing.assert_array_equal(moved[path], one[path], err_msg=str(path))


def test_a_moved_base_is_followed_and_a_changed_or_missing_one_refused(pretrained, tmp_path):
    base, moved, tuned = tmp_path / "base", tmp_path / "moved", tmp_path / "tuned"
    shutil.copytree(pretrained, base)
    model = _lora()
    cfg = lambda steps, **kw: TrainConfig(steps=steps, save_every=1, seed=7, **BASE, **kw)  # noqa: E731
    train(RECIPE, model, cfg(1, init_from=str(base)), tuned, **QUIET)
    files = lambda: {p: p.read_bytes() for p in tuned.rglob("*") if p.is_file()}  # noqa: E731
    before = files()
    shutil.copytree(base, moved)
    shutil.rmtree(base)
    with pytest.raises(ValueError, match=r"keeps its frozen weights in --init-from .*base \(checkpoint 3\), which "
                                         r"cannot be read now \(moved\? .*not a `sciscale train` run"):
        train(RECIPE, model, cfg(2), tuned, resume=True, **QUIET)
    assert files() == before
    # Read-only users (eval, embed, export, load_run) point at the new place without changing the run.
    tuned_params = _params(tuned, base=str(moved))
    assert all(np.array_equal(tuned_params[p], v) for p, v in _params(pretrained).items() if not is_lora(p))
    assert files() == before
    with pytest.raises(ValueError, match="holds its frozen weights in its checkpoints: it reads no base"):
        load_run(pretrained, base=str(moved), log=lambda *_: None)
    fasta = tmp_path / "p.fasta"
    fasta.write_text(">a\nMKTAYIAKQRQISFVKSHFSRQ\n")
    embed = ["embed", str(tuned), "--input", str(fasta), "--out", str(tmp_path / "e.npz")]
    assert cli.main(embed) == 2 and not (tmp_path / "e.npz").exists()
    assert cli.main([*embed, "--base", str(moved)]) == 0 and (tmp_path / "e.npz").exists()
    assert files() == before
    # Pointed at the base's new place, the run resumes there and remembers it.
    lines = []
    train(RECIPE, model, cfg(2, init_from=str(moved)), tuned, resume=True, progress=False, log=lines.append)
    assert any("the same fingerprint" in line for line in lines)
    assert json.loads((tuned / "run_config.json").read_text())["train"]["init_from"] == str(moved)
    before = files()
    other = tmp_path / "other"  # the same model trained from another seed
    train(RECIPE, MODEL, TrainConfig(steps=3, save_every=3, seed=2, **BASE), other, **QUIET)
    changed = r"keeps its frozen weights in --init-from .* no longer those the run started from \(fingerprint"
    with pytest.raises(ValueError, match=changed):  # another base offered in its place
        train(RECIPE, model, cfg(3, init_from=str(other)), tuned, resume=True, **QUIET)
    assert files() == before
    shutil.rmtree(moved / "checkpoints" / "3")  # the base overwritten in place
    shutil.copytree(other / "checkpoints" / "3", moved / "checkpoints" / "3")
    for attempt in (lambda: train(RECIPE, model, cfg(3), tuned, resume=True, **QUIET),
                    lambda: load_run(tuned, log=lambda *_: None),
                    lambda: load_run(tuned, base=str(other), log=lambda *_: None)):
        with pytest.raises(ValueError, match=changed):
            attempt()
    assert files() == before


def test_runs_started_from_an_adapters_only_run(pretrained, tmp_path):
    model = _lora()
    base = dict(seed=7, **BASE)
    train(RECIPE, model, TrainConfig(steps=2, save_every=2, init_from=str(pretrained), **base), tmp_path / "b",
          **QUIET)
    # The same adapters, trained further: its adapters and the base's weights, both read again.
    cfg = TrainConfig(steps=1, save_every=1, init_from=str(tmp_path / "b"), **base)
    train(RECIPE, model, cfg, tmp_path / "c", **QUIET)
    batch = jax.tree.map(np.asarray, RECIPE.build_data(cfg, model).train.batch(0))
    total, count = RECIPE.loss_fn(load_run(tmp_path / "b", log=lambda *_: None).model, batch, None)
    assert _first_loss(tmp_path / "c") == pytest.approx(float(total) / float(count), rel=1e-5)
    assert "frozen_weights" in json.loads((tmp_path / "c" / "run_config.json").read_text())
    assert all(n.split("/")[-1] in ("lora_a", "lora_b") for n in _saved_params(tmp_path / "c", 1))
    start, tuned = _params(pretrained), _params(tmp_path / "c")
    assert all(np.array_equal(tuned[p], start[p]) for p in tuned if not is_lora(p))
    # Fresh adapters of another rank: the old ones are folded into the kernels (computed, not read),
    # so that run writes its frozen weights.
    train(RECIPE, _lora(rank=2), TrainConfig(steps=1, save_every=1, init_from=str(tmp_path / "b"), **base),
          tmp_path / "d", **QUIET)
    assert "frozen_weights" not in json.loads((tmp_path / "d" / "run_config.json").read_text())
    assert any(n.endswith("kernel") for n in _saved_params(tmp_path / "d", 1))
