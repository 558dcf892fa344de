"""Bad input through the CLI and the Python API: one line naming the problem, nothing written, nothing trained.

Every CLI case runs ``sciscale train`` in this process and checks: a non-zero status, exactly
one line on stderr that starts ``sciscale: error:`` and names the value, no traceback, an
``--out`` that was not created (or, when it existed, was not changed), and that the run never
reached its run directory's lock or compilation.
"""

import dataclasses
import errno
import json
import os
import pathlib
import shutil
import signal
import subprocess

import jax
import numpy as np
import pytest
from flax import nnx

from sciscale_jax import cli, errors
from sciscale_jax.data import load_proteins
from sciscale_jax.models import Transformer, TransformerConfig
from sciscale_jax.recipes import get_recipe
from sciscale_jax.train import TrainConfig, build_optimizer, init_train_state, train
from sciscale_jax.train import loop
from sciscale_jax.train.checkpoint import Checkpointer, check_run_dir
from sciscale_jax.train.signals import RunInterrupted
from sciscale_jax.train.validate import validate_batch
from sciscale_jax.train.zo_budget import check_budget, evaluations_per_step

TINY = ["--layers", "1", "--embed-dim", "32", "--heads", "2", "--mlp-dim", "64", "--seq-len", "32", "--batch-size",
        "4", "--steps", "6", "--save-every", "2", "--eval-every", "3", "--no-progress"]


@pytest.fixture
def no_training(monkeypatch):
    """Record (and stop) any run that gets as far as locking its directory."""
    reached = []

    class Refuse:
        def __init__(self, run_dir):
            reached.append(str(run_dir))
            raise AssertionError("reached the run directory lock")
    monkeypatch.setattr(loop.rundir, "RunLock", Refuse)
    return reached


def _tree(path: pathlib.Path):
    if not path.exists():
        return None
    return sorted((str(p.relative_to(path)), p.stat().st_size, p.stat().st_mtime_ns) for p in path.rglob("*"))


def _refused(capsys, argv, match, out=None):
    capsys.readouterr()
    before = _tree(out) if out is not None else None
    rc = cli.main(["train", "protein-mlm", *argv])
    err = capsys.readouterr().err
    assert rc != 0, err
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("sciscale: error: ") and "Traceback" not in err
    import re
    assert re.search(match, lines[0]), lines[0]
    if out is not None:
        assert _tree(out) == before
    return lines[0]


CLI_CASES = {
    "lr_nan": (["--lr", "nan"], r"learning_rate=nan must be a finite number"),
    "lr_inf": (["--lr", "inf"], r"learning_rate=inf must be a finite number"),
    "lr_negative": (["--lr", "-0.1"], r"learning_rate=-0.1 must be positive"),
    "grad_clip_nan": (["--grad-clip", "nan"], r"grad_clip=nan must be a finite number"),
    "weight_decay_inf": (["--weight-decay", "inf"], r"weight_decay=inf must be a finite number"),
    "weight_decay_negative": (["--weight-decay", "-1"], r"weight_decay=-1.0 must be >= 0"),
    "seed_negative": (["--seed", "-1"], r"seed=-1 must be >= 0"),
    "seed_too_big": (["--seed", str(2 ** 40)], r"seed=1099511627776 must be <= 4294967295"),
    "optimizer_unknown": (["--optimizer", "nope"], r"--optimizer: invalid choice: 'nope'"),
    "steps_zero": (["--steps", "0"], r"steps=0 must be >= 1"),
    "keep_zero": (["--keep", "0"], r"keep=0 must be >= 1"),
    "warmup_negative": (["--warmup-steps", "-3"], r"warmup_steps=-3 must be >= 0"),
    "schedule_negative": (["--schedule-steps", "-1"], r"schedule_steps=-1 must be >= 0"),
    "grad_accum_not_dividing": (["--grad-accum", "3"], r"grad_accum=3 must be >= 1 and divide batch_size=4"),
    "mesh_duplicate_axis": (["--mesh", "tensor=2,data=8,data=4"], r"mesh axis 'data' is given twice"),
    "mesh_unknown_axis": (["--mesh", "model=2"], r"bad mesh item 'model=2'"),
    "mesh_zero": (["--mesh", "data=0"], r"positive integers or -1"),
    "mesh_too_big": (["--mesh", "data=16"], r"data=16 has 16 devices but 8 devices are available"),
    "mesh_not_dividing": (["--mesh", "data=3"], r"data=3 has 3 devices but 8 .*first M where M divides 8"),
    "ring_without_mesh": (["--attention", "ring"], r"attention='ring' splits the sequence over the mesh axis"),
    "ulysses_without_sequence_axis": (["--attention", "ulysses", "--mesh", "data=8"],
                                      r"attention='ulysses' .* mesh='data=8' has no sequence axis"),
    "sharding_without_mesh": (["--sharding", "tp"], r"sharding='tp' needs a mesh"),
    "sharding_unknown": (["--sharding", "nope", "--mesh", "data=8"], r"nope"),
    "zero_without_mesh": (["--zero", "2"], r"zero=2 needs a mesh"),
    "zero_stage_4": (["--zero", "4", "--mesh", "data=8"], r"4"),
    "offload_unknown": (["--offload", "gpu"], r"gpu"),
    "seq_len_over_max_len": (["--seq-len", "2000", "--max-len", "1024"], r"seq_len=2000 exceeds the model's max_len"),
    "heads_not_dividing": (["--heads", "3"], r"embed_dim=32 is not divisible by num_heads=3"),
    "layers_zero": (["--layers", "0"], r"num_layers=0 must be >= 1"),
    "max_len_negative": (["--max-len", "-5"], r"max_len=-5 must be >= 1"),
    "dropout_nan": (["--dropout", "nan"], r"dropout=nan must be a finite number"),
    "dropout_one": (["--dropout", "1.0"], r"dropout=1.0 must lie in \[0, 1\)"),
    "remat_unknown": (["--remat", "nope"], r"nope"),
    "attention_unknown": (["--attention", "nope"], r"--attention: invalid choice: 'nope'"),
    "precision_unknown": (["--precision", "fp3"], r"fp3"),
    "quant_unknown": (["--quant", "int3"], r"int3"),
    "mlp_unknown": (["--mlp", "relu"], r"--mlp: invalid choice: 'relu'"),
    "zeroth_order_with_grad_accum": (["--optimizer", "mezo", "--grad-accum", "2"],
                                     r"cannot be combined with grad_accum=2"),
}


@pytest.mark.parametrize("case", sorted(CLI_CASES))
def test_cli_refuses_bad_flags_in_one_line(case, tmp_path, capsys, no_training):
    argv, match = CLI_CASES[case]
    out = tmp_path / "out"
    _refused(capsys, ["--out", str(out), *TINY, *argv], match)
    assert not out.exists() and no_training == []


def test_deepzero_on_the_default_recipe_is_refused_naming_the_density(tmp_path, capsys, no_training):
    recipe = get_recipe("protein-mlm")
    model = Transformer(TransformerConfig(**recipe.model_defaults), rngs=nnx.Rngs(0))
    sizes = [int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(model, nnx.Param))]
    cost = lambda d: 1 + sum(max(1, int(round(d * n))) for n in sizes)  # noqa: E731  DeepZero: 1 + sum_l k_l
    out = tmp_path / "out"
    line = _refused(capsys, ["--out", str(out), "--optimizer", "deepzero"],
                    rf"optimizer 'deepzero' needs {cost(0.05):,} loss evaluations per step for {sum(sizes):,} "
                    r"parameters \(over 10,000")
    density = float(line.split("density=0.05 to <= ")[1].split(" ")[0])
    assert cost(density) <= 10_000 < cost(density * 1.1) and "--force" in line
    assert not out.exists() and no_training == []


def test_deepzero_cost_is_one_plus_the_kept_coordinates():
    rng = np.random.default_rng(0)
    params = {"a": rng.normal(size=(37, 11)), "b": rng.normal(size=(5,)), "c": rng.normal(size=(3, 3, 7))}
    kept = [max(1, int(round(0.05 * n))) for n in (37 * 11, 5, 63)]  # paper: k_l = max(1, round(d * n_l))
    assert evaluations_per_step("deepzero", params) == 1 + sum(kept) == 1 + 20 + 1 + 3
    assert evaluations_per_step("mezo", params, {"num_samples": 4}) == 8
    logged = []
    assert check_budget("deepzero", params, log=logged.append) == 25
    assert logged == ["deepzero: 25 loss evaluations per step (475 parameters)"]
    with pytest.raises(ValueError, match=r"needs 25 loss evaluations .*density=0.05 to <= 0.0"):
        check_budget("deepzero", params, limit=10)
    assert check_budget("deepzero", params, limit=10, force=True, log=logged.append) == 25
    assert check_budget("adamw", params) is None


def test_out_is_an_existing_file(tmp_path, capsys, no_training):
    out = tmp_path / "file"
    out.write_text("keep me")
    _refused(capsys, ["--out", str(out), *TINY], r"--out .*/file is an existing file, not a directory", out)
    assert out.read_text() == "keep me"


def test_out_under_a_file(tmp_path, capsys, no_training):
    (tmp_path / "file").write_text("x")
    _refused(capsys, ["--out", str(tmp_path / "file" / "run"), *TINY], r"lies under .*/file, which is a file")


def test_out_on_a_read_only_file_system(tmp_path, capsys, no_training):
    mnt = tmp_path / "ro"
    mnt.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(mnt)],
                                           capture_output=True).returncode:
        if os.geteuid() == 0:
            pytest.skip("cannot mount a read-only tmpfs")
        mnt.chmod(0o500)  # not root: a directory without write permission
    try:
        _refused(capsys, ["--out", str(mnt / "run"), *TINY], r"ro is not writable \(permission denied or read-only\)")
    finally:
        subprocess.run(["umount", str(mnt)], capture_output=True)
        mnt.chmod(0o700)


def test_resume_without_a_checkpoint(tmp_path, capsys, no_training):
    _refused(capsys, ["--out", str(tmp_path / "typo"), "--resume", *TINY], r"--resume: .*/typo does not exist")
    assert not (tmp_path / "typo").exists()
    (tmp_path / "empty").mkdir()
    _refused(capsys, ["--out", str(tmp_path / "empty"), "--resume", *TINY], r"--resume: .*/empty holds no checkpoint",
             tmp_path / "empty")


def _saved_run(out, argv):
    """A run directory holding a step-0 checkpoint and the config of ``argv`` (no training)."""
    recipe, model_cfg, train_cfg = cli.build_configs(["protein-mlm", *argv])
    tx = build_optimizer(train_cfg)
    _, state = init_train_state(Transformer(model_cfg, rngs=nnx.Rngs(0)), tx)
    check_run_dir(out, {"recipe": recipe.name, "model": model_cfg.to_dict(), "train": train_cfg.to_dict()},
                  resume=False)
    ckpt = Checkpointer(out, save_every=1)
    ckpt.save(state, force=True)
    ckpt.close()


def test_resume_force_with_another_model_size_is_one_line(tmp_path, capfd):
    out = tmp_path / "run"
    _saved_run(out, TINY)
    capfd.readouterr()
    before = _tree(out / "checkpoints")
    rc = cli.main(["train", "protein-mlm", "--out", str(out), "--resume", "--force", *TINY, "--embed-dim", "64"])
    err = capfd.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "Traceback" not in err, err
    assert err.startswith(f"sciscale: error: checkpoint {out}/checkpoints/0 was saved by a different model")
    assert _tree(out / "checkpoints") == before


def test_changed_settings_on_resume_are_refused_before_writing(tmp_path, capsys):
    out = tmp_path / "run"
    _saved_run(out, TINY)
    _refused(capsys, ["--out", str(out), "--resume", *TINY, "--lr", "0.1"],
             r"holds a different run; differing settings: train.learning_rate", out)


def test_resume_keeps_the_runs_settings_for_flags_left_out(tmp_path, capsys):
    """``--resume --steps N`` alone extends a run: every flag left out keeps the saved setting
    (model shapes, techniques, optimizer), a flag given that equals it is accepted, and the
    schedule keeps its length; the recipe's defaults (4 layers, no remat) would be a different run."""
    out = tmp_path / "run"
    _saved_run(out, [*TINY, "--remat", "full", "--lr", "0.01", "--warmup-steps", "2"])
    saved = json.loads((out / "run_config.json").read_text())
    assert (saved["model"]["num_layers"], saved["model"]["remat"]) != (4, "none")  # not the defaults
    capsys.readouterr()
    assert cli.main(["train", "protein-mlm", "--out", str(out), "--resume", "--steps", "1", "--heads", "2",
                     "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert f"settings not given: those of the run in {out} (resumed)" in printed
    now = json.loads((out / "run_config.json").read_text())
    assert now["model"] == saved["model"]
    assert now["train"] == {**saved["train"], "steps": 1, "schedule_steps": 6}


def test_another_recipes_run_is_named_as_such(tmp_path):
    out = tmp_path / "run"
    _saved_run(out, TINY)
    for resume in (True, False):
        with pytest.raises(ValueError, match=r"holds a 'protein-mlm' run, not a 'msa-evoformer' one; choose another"):
            check_run_dir(out, {"recipe": "msa-evoformer", "model": {}, "train": {}}, resume=resume)


def test_debug_shows_the_traceback(tmp_path):
    with pytest.raises(ValueError, match="learning_rate=nan"):
        cli.main(["train", "protein-mlm", "--out", str(tmp_path / "o"), "--lr", "nan", "--debug"])


@pytest.mark.parametrize("err, status, line", [
    (OSError(errno.ENOSPC, "No space left on device", "/d/x"), 1, "error: no space left on device: /d/x"),
    (OSError(errno.EROFS, "Read-only file system", "/ro"), 1, "error: read-only file system: /ro"),
    (PermissionError(errno.EACCES, "Permission denied", "/p"), 1, "error: permission denied: /p"),
    (NotADirectoryError(errno.ENOTDIR, "Not a directory", "/f/x"), 1,
     "error: a path component is a file, not a directory: /f/x"),
    (FileExistsError(errno.EEXIST, "File exists", "/e"), 1, "error: already exists: /e"),
    (KeyboardInterrupt(), 130, "interrupted; checkpoints written before"),
    (RunInterrupted(signal.SIGTERM, "stopped by SIGTERM after step 4; checkpoint 4 saved"), 143,
     "stopped by SIGTERM after step 4"),
    (RunInterrupted(signal.SIGINT, "stopped by SIGINT after step 2"), 130, "stopped by SIGINT after step 2"),
    (MemoryError(), 1, "error: out of host memory"),
    (TypeError("bad\nsecond line"), 1, "error: TypeError: bad (rerun with --debug for the traceback)"),
])
def test_every_error_maps_to_one_line(err, status, line):
    code, text = errors.describe(err)
    assert code == status and text.startswith(line) and "\n" not in text


# ------------------------------------------------------------------ Python API

@pytest.mark.parametrize("kwargs, match", [
    (dict(steps=2.5), r"steps=2.5 must be an integer"),
    (dict(steps=True), r"steps=True must be an integer"),
    (dict(optimizer="nope"), r"unknown optimizer 'nope'"),
    (dict(learning_rate=float("nan")), r"learning_rate=nan must be a finite number"),
    (dict(grad_clip=float("inf")), r"grad_clip=inf must be a finite number"),
    (dict(seed=-1), r"seed=-1 must be >= 0"),
    (dict(seed=1.5), r"seed=1.5 must be an integer"),
    (dict(batch_size="16"), r"batch_size='16' must be an integer"),
])
def test_train_config_refuses(kwargs, match):
    with pytest.raises(ValueError, match=match):
        TrainConfig(**kwargs)


@pytest.mark.parametrize("kwargs, match", [
    (dict(rope_base=0.0), r"rope_base=0.0 must be positive"),
    (dict(rope_base=-10.0), r"rope_base=-10.0 must be positive"),
    (dict(rope_base=float("nan")), r"rope_base=nan must be a finite number"),
    (dict(dtype="int32"), r"dtype='int32' must be a floating-point dtype"),
    (dict(param_dtype="bool"), r"param_dtype='bool' must be a floating-point dtype"),
    (dict(dtype="nonsense"), r"dtype='nonsense' is not a dtype"),
    (dict(num_layers=True), r"num_layers=True must be an integer"),
    (dict(embed_dim=32.0), r"embed_dim=32.0 must be an integer"),
])
def test_transformer_config_refuses(kwargs, match):
    with pytest.raises(ValueError, match=match):
        TransformerConfig(**{"vocab_size": 32, **kwargs})


def _bad_data_recipe(change):
    recipe = get_recipe("protein-mlm")

    def build_data(cfg, model_cfg=None):
        data = recipe.build_data(cfg, model_cfg)

        class Train:
            def batch(self, step):
                return change(dict(data.train.batch(step)))
        return dataclasses.replace(data, train=Train(), eval=[change(dict(b)) for b in data.eval])
    return dataclasses.replace(recipe, build_data=build_data)


def _with(key, fn):
    def change(b):
        b[key] = fn(b[key])
        return b
    return change


def _without(key):
    def change(b):
        b.pop(key)
        return b
    return change


DATA_CASES = {
    "ids_outside_vocab": (_with("inputs", lambda x: x + 40), r"training batch 0\['inputs'\] holds ids in \[\d+, \d+\], "
                                                             r"outside the vocabulary \[0, 32\)"),
    "negative_targets": (_with("targets", lambda x: x - 100), r"\['targets'\] holds ids in \[-\d+"),
    "float_tokens": (_with("inputs", lambda x: x.astype(np.float32)), r"\['inputs'\] holds token ids and must have "
                                                                      r"an integer dtype, got float32"),
    "nan_weights": (_with("weights", lambda w: np.where(w > 0, np.nan, w)), r"\['weights'\] must hold finite"),
    "float_mask": (_with("mask", lambda m: m.astype(np.float32) * 0.5), r"\['mask'\] must be boolean"),
    "batch_sizes_disagree": (_with("weights", lambda w: w[:-1]), r"disagree on the batch size"),
    "missing_mask": (_without("mask"), r"the loss reads the batch field 'mask', which the recipe's batches lack"),
}


@pytest.mark.parametrize("case", sorted(DATA_CASES))
def test_bad_batches_are_refused_before_anything_is_written(case, tmp_path, no_training):
    change, match = DATA_CASES[case]
    model = TransformerConfig(vocab_size=32, num_layers=1, num_heads=2, embed_dim=32, mlp_dim=64, max_len=64)
    cfg = TrainConfig(steps=2, batch_size=4, seq_len=32)
    with pytest.raises(ValueError, match=match) as exc:
        train(_bad_data_recipe(change), model, cfg, tmp_path / "out", progress=False)
    assert "\n" not in str(exc.value) and not (tmp_path / "out").exists() and no_training == []


def test_validate_batch_requires_fields_and_eval_batches_match():
    rng = np.random.default_rng(3)
    batch = {"inputs": rng.integers(0, 29, (3, 7)).astype(np.int32), "mask": np.ones((3, 7), bool)}
    validate_batch(batch, 29, required=("inputs", "mask"))
    with pytest.raises(ValueError, match=r"evaluation batch 2 lacks the field\(s\) \['targets'\]"):
        validate_batch(batch, 29, required=("inputs", "targets"), where="evaluation batch 2")
    with pytest.raises(ValueError, match=r"holds ids in \[0, 28\], outside the vocabulary \[0, 28\)"):
        validate_batch({**batch, "inputs": np.array([[0, 28]], np.int32)[[0, 0, 0]]}, 28)


@pytest.mark.parametrize("content, match", [
    (b"", r"holds no protein sequences"),
    (b"id,sequence\n1,MKV\n", r"is not a FASTA file: line 1 comes before any '>' header"),
    (b"\x89PNG\r\n\x1a\n\x00\x00\xff\xfe", r"is not a FASTA text file"),
    (b">only_a_header\n>another\n", r"holds no protein sequences"),
])
def test_load_proteins_refuses_files_that_hold_no_proteins(tmp_path, content, match):
    path = tmp_path / "data.faa"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=match) as exc:
        load_proteins(path)
    assert str(path) in str(exc.value) and "\n" not in str(exc.value)
    path.write_bytes(b">a\nMKV*\n\n>b desc\nAC\nDE\n")
    assert load_proteins(path) == ["MKV", "ACDE"]


def test_refused_input_leaves_an_existing_run_untouched(tmp_path, capsys):
    out = tmp_path / "run"
    _saved_run(out, TINY)
    shutil.copy(out / "run_config.json", tmp_path / "saved.json")
    _refused(capsys, ["--out", str(out), "--resume", *TINY, "--lr", "nan"], r"learning_rate=nan", out)
    assert (out / "run_config.json").read_text() == (tmp_path / "saved.json").read_text()
