"""Starting a run from another run's parameters (``--init-from``, ``TrainConfig.init_from``):
pretrain, then fine-tune on other data.

The reference is independent of the code under test: the first step's logged loss of the new
run must equal the source checkpoint's model (``load_run``) evaluated by the recipe's loss on
the new run's first batch, on one device and on a data x fsdp x tensor mesh with ZeRO-3 (where
the parameters must arrive split, not whole on every device). The new run counts from step 0,
records the checkpoint it started from, and keeps that record when resumed. Another recipe's
run, a directory that is not a run, other model shapes and a missing step are refused in one
line before anything is written.
"""

import json
import re

import jax
import numpy as np
import pytest
from flax import nnx

from sciscale_jax import cli
from sciscale_jax.recipes import get_recipe, load_run
from sciscale_jax.train import TrainConfig, rundir, train

RECIPE = get_recipe("protein-mlm")
MODEL = RECIPE.make_config(num_layers=2, num_heads=2, embed_dim=32, mlp_dim=64, max_len=64)
SOURCE = TrainConfig(steps=4, batch_size=8, seq_len=32, save_every=2, eval_every=100, log_every=1, warmup_steps=1,
                     seed=1)
TINY = ["--layers", "2", "--embed-dim", "32", "--heads", "2", "--mlp-dim", "64", "--max-len", "64", "--seq-len", "32",
        "--batch-size", "8", "--steps", "1", "--no-progress"]


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    run = tmp_path_factory.mktemp("init") / "pretrained"
    train(RECIPE, MODEL, SOURCE, run, progress=False, log=lambda *_: None)
    return run


def _first_loss(run) -> float:
    return next(json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()
                if json.loads(line).get("step") == 1 and "loss" in json.loads(line))


@pytest.mark.parametrize("mesh, zero", [("", 0), ("data=2,fsdp=2,tensor=2", 3)])
def test_a_run_starts_from_another_runs_parameters(source, tmp_path, mesh, zero):
    cfg = TrainConfig(steps=1, batch_size=8, seq_len=32, save_every=1, eval_every=100, log_every=1, warmup_steps=1,
                      seed=7, init_from=str(source), mesh=mesh, zero=zero)
    result = train(RECIPE, MODEL, cfg, tmp_path / "tuned", progress=False, log=lambda *_: None)
    # The reference: the source's newest checkpoint as a model, scored by the recipe's loss on this
    # run's first batch (dropout is off, so the step's key does not enter).
    pretrained = load_run(source, log=lambda *_: None)
    assert pretrained.step == 4
    batch = RECIPE.build_data(cfg, MODEL).train.batch(0)
    total, count = RECIPE.loss_fn(pretrained.model, jax.tree.map(np.asarray, batch), None)
    expected = float(total) / float(count)
    assert _first_loss(tmp_path / "tuned") == pytest.approx(expected, rel=1e-5, abs=1e-6)
    total, count = RECIPE.loss_fn(RECIPE.build_model(MODEL, nnx.Rngs(cfg.seed)), jax.tree.map(np.asarray, batch), None)
    assert float(total) / float(count) > expected + 0.05  # the model this run would start from: the check has a signal
    assert result["steps"] == 1 and int(result["state"].step) == 1  # counted from step 0
    saved = json.loads((tmp_path / "tuned" / "run_config.json").read_text())["train"]
    assert saved["init_from"] == str(source) and saved["init_step"] == 4
    if mesh:  # ZeRO-3 on 8 devices: every weight matrix arrives split, none whole on each device
        matrices = [x for x in jax.tree.leaves(result["state"].params) if x.ndim == 2]
        assert matrices and all(x.addressable_shards[0].data.size < x.size for x in matrices)
    else:  # resumed by the same command with more steps: the record of where it started is kept
        more = TrainConfig(**{**cfg.to_dict(), "steps": 2})
        train(RECIPE, MODEL, more, tmp_path / "tuned", resume=True, progress=False, log=lambda *_: None)
        saved = json.loads((tmp_path / "tuned" / "run_config.json").read_text())["train"]
        assert (saved["steps"], saved["init_from"], saved["init_step"]) == (2, str(source), 4)


def test_a_run_from_another_run_takes_its_model_settings_but_not_its_techniques(source, tmp_path, capsys):
    """``--init-from RUN`` with no model flags: RUN's depth, widths and lengths (no flag repeated),
    this run's own technique switches (RUN's bf16 and remat are not taken), a model flag given wins;
    the run then starts from RUN's parameters (its first loss is RUN's model's on that batch)."""
    fake = tmp_path / "fake"
    fake.mkdir()
    (fake / "run_config.json").write_text(json.dumps({"recipe": "protein-mlm", "train": {}, "model": {
        **MODEL.to_dict(), "precision": "bf16", "remat": "full", "dropout": 0.1}}))
    _, model_cfg, _ = cli.build_configs(["protein-mlm", "--init-from", str(fake), "--scan-layers", "--dropout", "0.2"])
    assert model_cfg == RECIPE.make_config(**{**MODEL.to_dict(), "scan_layers": True, "dropout": 0.2})
    assert (model_cfg.precision, model_cfg.remat) == ("fp32", "none")
    other = tmp_path / "other"
    other.mkdir()
    (other / "run_config.json").write_text(json.dumps({"recipe": "smiles-lm", "train": {}, "model": {"num_layers": 9}}))
    assert cli.build_configs(["protein-mlm", "--init-from", str(other)])[1] == RECIPE.make_config()  # refused later

    out = tmp_path / "tuned"
    capsys.readouterr()
    assert cli.main(["train", "protein-mlm", "--out", str(out), "--init-from", str(source), "--seq-len", "32",
                     "--batch-size", "8", "--steps", "1", "--log-every", "1", "--seed", "7", "--no-progress"]) == 0
    assert f"settings not given: those of the model of --init-from {source}" in capsys.readouterr().out
    assert json.loads((out / "run_config.json").read_text())["model"] == MODEL.to_dict()
    pretrained = load_run(source, log=lambda *_: None)
    cfg = TrainConfig(steps=1, batch_size=8, seq_len=32, seed=7)
    total, count = RECIPE.loss_fn(pretrained.model, jax.tree.map(np.asarray, RECIPE.build_data(cfg, MODEL).train.batch(0)),
                                  None)
    assert _first_loss(out) == pytest.approx(float(total) / float(count), rel=1e-5, abs=1e-6)


def test_a_resumed_run_keeps_the_record_of_where_it_started(tmp_path):
    (tmp_path / "run_config.json").write_text(json.dumps({"train": {"init_from": "/runs/a", "init_step": 600}}))
    kept = [rundir.keep_init(tmp_path, TrainConfig(init_from=f, init_step=s), resume=True)
            for f, s in (("", 0), ("/runs/a", 0), ("/runs/a", 600))]
    assert all((c.init_from, c.init_step) == ("/runs/a", 600) for c in kept)
    for other in (TrainConfig(init_from="/runs/b"), TrainConfig(init_from="/runs/a", init_step=300)):
        assert rundir.keep_init(tmp_path, other, resume=True) == other  # left for check_run_dir to refuse
    assert rundir.keep_init(tmp_path, TrainConfig(), resume=False) == TrainConfig()


def test_bad_init_from_is_refused_in_one_line_before_anything_is_written(source, tmp_path, capsys):
    other = tmp_path / "smiles_run"
    other.mkdir()
    (other / "run_config.json").write_text(json.dumps({"recipe": "smiles-lm", "model": {}, "train": {}}))
    (tmp_path / "empty").mkdir()
    cases = [
        ([str(other)], r"--init-from .*smiles_run holds a 'smiles-lm' run, not 'protein-mlm'"),
        ([str(tmp_path / "empty")], r"--init-from .*empty: not a `sciscale train` run directory"),
        ([str(source), "--init-step", "3"], r"--init-from: no checkpoint 3 under .*; there are: \[1, 2, 4\]"),
        ([str(source), "--embed-dim", "64"], r"--init-from: checkpoint .*/4 was saved by a different model .*"
                                             r"params/.*: saved \(\(\d+, 32\).*start from a run of the same model"
                                             r" shapes \(it has embed_dim=32 \(this run: 64\): leave those model "
                                             r"flags out\)$"),
    ]
    for args, match in cases:
        out = tmp_path / "new"
        capsys.readouterr()
        assert cli.main(["train", "protein-mlm", "--out", str(out), *TINY, "--init-from", *args]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("sciscale: error: ") and "\n" not in err, err
        assert re.search(match, err), err
        assert not out.exists()
    with pytest.raises(ValueError, match="init_step=2 must be >= 0 and needs init_from"):
        TrainConfig(init_step=2)
