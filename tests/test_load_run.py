"""A trained run back as a model: ``load_run``, ``sciscale eval`` and ``sciscale embed``.

Reference runs are trained once per module (tiny protein-mlm, 6 steps, checkpoints and
evaluations at 3 and 6). The loaded model must hold the checkpoint's arrays bit for bit, and
its evaluation must reproduce the validation figures the training loop logged in
``metrics.jsonl`` at that step; a run trained on a mesh loads onto one device; batched, padded
embeddings must equal each protein's hidden states computed alone.
"""

import dataclasses
import json
import shutil

import jax
import numpy as np
import pytest
from flax import nnx

from sciscale_jax import cli
from sciscale_jax.recipes import get_recipe, load_run
from sciscale_jax.train import TrainConfig, split_model, train
from sciscale_jax.train.checkpoint import CheckpointError

RECIPE = get_recipe("protein-mlm")
MODEL = RECIPE.config_class(vocab_size=32, num_layers=1, num_heads=2, embed_dim=32, mlp_dim=64, max_len=64)
CFG = TrainConfig(steps=6, batch_size=4, seq_len=32, save_every=3, eval_every=3, log_every=1, warmup_steps=2, seed=3)


def _logged_validation(run_dir) -> dict:
    """{step: {val_*: value}} as the training loop wrote them."""
    out = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if "val_loss" in record:
            out[record["step"]] = {k: v for k, v in record.items() if k.startswith("val_")}
    return out


def _equal(a, b):
    jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)), a, b)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("load") / "run"
    result = train(RECIPE, MODEL, CFG, out, progress=False, log=lambda *_: None)
    return out, result["state"]


def test_loaded_model_holds_the_checkpoint_and_reproduces_the_logged_validation(reference):
    out, state = reference
    run = load_run(out, log=lambda *_: None)
    assert run.step == 6 and run.recipe is RECIPE and run.model_config == MODEL and run.train_config == CFG
    _, params, rest = split_model(run.model)
    _equal(params, state.params)
    _equal(rest, state.rest)
    assert all(x.sharding.device_set == {jax.devices()[0]} for x in jax.tree.leaves(params))
    logged = _logged_validation(out)
    assert sorted(logged) == [3, 6]
    for step in (6, 3):
        figures = load_run(out, step=step, log=lambda *_: None).evaluate()
        assert figures.keys() == logged[step].keys()
        for name, value in logged[step].items():
            assert figures[name] == pytest.approx(value, rel=1e-6), (step, name)
    assert logged[3]["val_loss"] != pytest.approx(logged[6]["val_loss"], rel=1e-3)  # the steps are told apart
    tokens = np.random.default_rng(0).integers(4, 29, (2, 11)).astype(np.int32)
    fresh = RECIPE.build_model(MODEL, nnx.Rngs(0))
    nnx.update(fresh, nnx.State(nnx.to_pure_dict(nnx.state(run.model))))  # an independent copy of the weights
    np.testing.assert_array_equal(run.model(tokens), fresh(tokens))
    hidden = run.model.hidden(tokens)  # per-token embeddings: what the LM head reads
    assert hidden.shape == (2, 11, MODEL.embed_dim)
    np.testing.assert_array_equal(run.model.lm_head(hidden).astype(np.float32), run.model(tokens))


def test_damaged_newest_checkpoint_is_skipped_and_left_in_place(reference, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(reference[0], out)
    for data in (p for p in (out / "checkpoints" / "6").rglob("*") if p.is_file() and p.parent.name == "d"):
        data.write_bytes(data.read_bytes()[:40])  # every data file: which one holds the parameters varies
    logged = []
    run = load_run(out, log=logged.append)
    assert run.step == 3
    assert len(logged) == 1 and logged[0].startswith("checkpoint 6 is damaged") and "\n" not in logged[0]
    assert (out / "checkpoints" / "6").is_dir()  # read-only: nothing renamed under a run that may be live
    with pytest.raises(CheckpointError, match="checkpoint .*6 is damaged"):
        load_run(out, step=6, log=lambda *_: None)


def test_bad_requests_are_refused_in_one_line(reference, tmp_path):
    out = reference[0]
    cases = [
        (lambda: load_run(tmp_path), ValueError, "no readable run_config.json"),
        (lambda: load_run(tmp_path / "absent"), ValueError, "is not a directory"),
        (lambda: load_run(out, step=4), FileNotFoundError, r"no checkpoint 4 .*there are: \[1, 3, 6\]"),
        (lambda: load_run(out, embed_dim=64, log=lambda *_: None), ValueError, "saved by a different model"),
        (lambda: load_run(out, attention="nope"), ValueError, "unknown attention implementation 'nope'"),
        (lambda: load_run(out, wings=2), ValueError, "protein-mlm models have no setting wings"),
        (lambda: load_run(out, attention="ring"), ValueError, "attention='ring' needs a mesh"),
        (lambda: load_run(out, mesh="fsdp=2", attention="ring"), ValueError,
         "attention='ring' needs a mesh with a sequence axis; loading onto mesh='fsdp=2'"),
        (lambda: load_run(out, mesh="pipeline=2"), ValueError, "not a pipeline axis"),
        (lambda: load_run(out, mesh="data=3"), ValueError, "data=3 has 3 devices but 8"),
        (lambda: load_run(out, mesh="tensor=4"), ValueError,  # the model has 2 heads
         r"loading onto mesh='tensor=4': .*\['attn'\].* dimension 1 of size 2 is not divisible by tensor=4"),
        (lambda: load_run(out, mesh="dap=2"), ValueError, "does not support Dynamic Axial Parallelism"),
    ]
    odd = tmp_path / "odd"
    shutil.copytree(out, odd)
    saved = json.loads((odd / "run_config.json").read_text())
    saved["model"]["wings"] = 2
    (odd / "run_config.json").write_text(json.dumps(saved))
    cases.append((lambda: load_run(odd), ValueError, "model settings this version does not know: wings"))
    for call, error, match in cases:
        with pytest.raises(error, match=match) as info:
            call()
        assert "\n" not in str(info.value)


@pytest.mark.slow
def test_run_trained_on_a_mesh_loads_on_one_device(tmp_path):
    """Parameters sharded over fsdp with ZeRO-3, restored whole onto one device."""
    out = tmp_path / "mesh"
    result = train(RECIPE, MODEL, dataclasses.replace(CFG, mesh="data=2,fsdp=2", zero=3), out, progress=False,
                   log=lambda *_: None)
    assert any(len(x.sharding.device_set) == 4 for x in jax.tree.leaves(result["state"].params))
    run = load_run(out, log=lambda *_: None)
    _, params, _ = split_model(run.model)
    _equal(params, jax.device_get(result["state"].params))
    assert all(x.sharding.device_set == {jax.devices()[0]} for x in jax.tree.leaves(params))
    figures = run.evaluate()
    for name, value in _logged_validation(out)[6].items():  # evaluated sharded there, on one device here
        assert figures[name] == pytest.approx(value, rel=1e-5, abs=1e-7), name


def test_run_loads_sharded_onto_any_mesh_and_evaluates_as_logged(reference, tmp_path, capsys):
    """A one-device run loaded into shards on data x fsdp x tensor: each device holds about a
    quarter of the weights, the arrays are the checkpoint's, the model computes what it computes
    on one device, and `sciscale eval --mesh` (batches split over data x fsdp) reproduces the
    figures the training loop logged."""
    out, state = reference
    logged = []
    run = load_run(out, mesh="data=2,fsdp=2,tensor=2", log=logged.append)
    assert logged == [] and run.model_config.sharding == "fsdp_tp" and run.mesh.size == 8
    _, params, rest = split_model(run.model)
    _equal(params, state.params)
    _equal(rest, state.rest)
    assert params["layers"][0]["mlp"]["wi"]["kernel"].sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor")
    first = jax.devices()[0]
    held = sum(s.data.nbytes for x in jax.tree.leaves(params) for s in x.addressable_shards if s.device == first)
    whole = sum(x.nbytes for x in jax.tree.leaves(params))
    assert 0.25 <= held / whole < 0.27, held / whole  # matrices split 4 ways (fsdp x tensor), norm scales 2 ways
    tokens = np.random.default_rng(1).integers(4, 29, (4, 16)).astype(np.int32)
    alone = load_run(out, log=lambda *_: None).model(tokens)
    np.testing.assert_allclose(run.model(tokens), alone, rtol=1e-5, atol=1e-5)  # XLA places the activations
    with run.on_mesh():  # the activations follow the rule table: batch over data x fsdp
        np.testing.assert_allclose(jax.jit(lambda m, t: m(t))(run.model, tokens), alone, rtol=1e-5, atol=1e-5)
    target = tmp_path / "eval.json"
    assert cli.main(["eval", str(out), "--mesh", "data=2,fsdp=2,tensor=2", "--json", str(target), "--no-report"]) == 0
    assert "checkpoint step 6" in capsys.readouterr().out
    figures = json.loads(target.read_text())["validation"]
    logged = _logged_validation(out)[6]
    assert figures.keys() == logged.keys()
    for name, value in logged.items():  # evaluated on one device there, split over 8 here
        assert figures[name] == pytest.approx(value, rel=1e-5, abs=1e-7), name
    assert cli.main(["eval", str(out), "--mesh", "pipeline=8"]) == 2
    assert "not a pipeline axis" in capsys.readouterr().err


def test_mesh_only_settings_are_dropped_for_one_device(reference, tmp_path):
    """A run saved with ring attention and an fsdp rule table (both need the training mesh)."""
    out = tmp_path / "run"
    shutil.copytree(reference[0], out)
    saved = json.loads((out / "run_config.json").read_text())
    saved["model"].update(attention="ring", sharding="fsdp")
    (out / "run_config.json").write_text(json.dumps(saved))
    logged = []
    run = load_run(out, log=logged.append)
    assert run.model_config.attention == "auto" and run.model_config.sharding is None
    assert logged == ["sharding='fsdp' needs the training mesh; loading with sharding=None",
                      "attention='ring' needs the training mesh; loading with attention='auto'"]
    assert load_run(out, attention="chunked", log=lambda *_: None).model_config.attention == "chunked"
    _equal(split_model(run.model)[1], reference[1].params)
    # onto a mesh: ring attention stays where there is a sequence axis; the rule table is the mesh's
    logged.clear()
    run = load_run(out, mesh="fsdp=2,sequence=4", log=logged.append)
    assert (run.model_config.attention, run.model_config.sharding, logged) == ("ring", "fsdp", [])
    run = load_run(out, mesh="data=4,tensor=2", log=logged.append)
    assert (run.model_config.attention, run.model_config.sharding) == ("auto", "tp")
    assert logged == ["sharding='fsdp' was for the training mesh; loading onto mesh='data=4,tensor=2' with "
                      "sharding='tp'", "attention='ring' needs the training mesh; loading with attention='auto'"]


def test_cli_eval_prints_and_writes_the_step_figures(reference, tmp_path, capsys):
    out = reference[0]
    target = tmp_path / "eval.json"
    assert cli.main(["eval", str(out), "--step", "3", "--json", str(target)]) == 0
    printed = capsys.readouterr().out
    assert f"run {out}: protein-mlm, checkpoint step 3" in printed
    assert "validation loss " in printed and "baseline unigram_loss" in printed
    written = json.loads(target.read_text())
    assert written["step"] == 3
    assert written["validation"]["val_loss"] == pytest.approx(_logged_validation(out)[3]["val_loss"], rel=1e-6)
    assert set(written["baselines"]) >= {"unigram_loss", "context_free_loss"}
    # a model flag replaces the run's setting: chunked attention computes the same figures
    assert cli.main(["eval", str(out), "--step", "3", "--attention", "chunked", "--json", str(target)]) == 0
    assert json.loads(target.read_text())["validation"]["val_loss"] == pytest.approx(written["validation"]["val_loss"],
                                                                                      rel=1e-5)
    assert cli.main(["eval", str(out), "--help"]) == 0
    assert "--embed-dim INT       default: 32" in capsys.readouterr().out  # the run's value, not the recipe's
    for argv, match in ((["eval", str(tmp_path)], "no readable run_config.json"),
                        (["eval"], "the run directory is missing"),
                        (["eval", str(out), "--embed-dim", "64"], "load it with the settings it was trained with"),
                        (["eval", str(out), "--step", "5"], "no checkpoint 5"),
                        (["eval", str(out), "--json", str(tmp_path / "no" / "x.json")], "cannot write a file there"),
                        (["eval", str(out), "--bogus"], "unrecognized arguments: --bogus")):
        assert cli.main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert match in err and "\n" not in err, argv


def _fasta(path, records):
    path.write_text("".join(f">{name} some description\n{seq[:30]}\n{seq[30:]}\n" for name, seq in records))
    return path


def test_cli_embed_equals_each_protein_run_alone(reference, tmp_path, capsys):
    """Embeddings of a FASTA file, batched with padding under a key mask, equal each protein's hidden
    states computed alone without padding (a mask that let padding in would change them)."""
    from sciscale_jax.data import ProteinTokenizer
    from sciscale_jax.data.protein import STANDARD

    rng = np.random.default_rng(5)
    lengths = (3, 20, 62, 45, 11)  # 62 residues + cls/eos = max_len 64
    records = [(f"p{i}", "".join(rng.choice(list(STANDARD), n))) for i, n in enumerate(lengths)]
    target = tmp_path / "emb.npz"
    argv = ["embed", str(reference[0]), "--input", str(_fasta(tmp_path / "in.fa", records)), "--out", str(target),
            "--batch-size", "2"]
    assert cli.main(argv) == 0
    assert "checkpoint step 6" in capsys.readouterr().out
    saved = np.load(target)
    assert list(saved["names"]) == [name for name, _ in records]
    np.testing.assert_array_equal(saved["offsets"], np.cumsum((0,) + lengths))
    model = load_run(reference[0], log=lambda *_: None).model
    tok = ProteinTokenizer()
    for i, (_, seq) in enumerate(records):
        alone = np.asarray(model.hidden(tok.encode(seq, add_special=True)[None]))[0, 1:-1]
        rows = saved["per_residue"][saved["offsets"][i]:saved["offsets"][i + 1]]
        np.testing.assert_allclose(rows, alone, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(saved["mean"][i], alone.mean(0), rtol=1e-5, atol=1e-5)
    assert np.abs(saved["mean"][0] - saved["mean"][1]).max() > 1e-3  # proteins told apart
    sharded = tmp_path / "sharded.npz"  # the weights split over 4 devices: the same embeddings
    assert cli.main(argv[:-3] + [str(sharded), "--batch-size", "2", "--mesh", "fsdp=4"]) == 0
    np.testing.assert_allclose(np.load(sharded)["per_residue"], saved["per_residue"], rtol=1e-5, atol=1e-5)


def test_cli_embed_refuses_bad_input_before_writing(reference, tmp_path, capsys):
    out = reference[0]
    other = tmp_path / "weather"
    other.mkdir()
    (other / "run_config.json").write_text(json.dumps({"recipe": "weather-vit", "model": {}, "train": {}}))
    good = _fasta(tmp_path / "good.fa", [("a", "MKTAYIAKQR")])
    target = tmp_path / "e.npz"
    for argv, match in (
            (["embed", str(out), "--input", str(_fasta(tmp_path / "j.fa", [("x1", "MKJAY")])), "--out", str(target)],
             "record 'x1': unknown residue symbols ['J']"),
            (["embed", str(out), "--input", str(_fasta(tmp_path / "long.fa", [("big", "A" * 63)])), "--out",
              str(target)], "record 'big': 63 residues + cls/eos exceed the model's max_len=64"),
            (["embed", str(out), "--input", str(_fasta(tmp_path / "empty.fa", [])), "--out", str(target)],
             "holds no protein sequences"),
            (["embed", str(out), "--input", str(tmp_path / "absent.fa"), "--out", str(target)], "no such file"),
            (["embed", str(out), "--input", str(good), "--out", str(tmp_path / "no" / "e.npz")],
             "--out " + str(tmp_path / "no" / "e.npz") + ": cannot write a file there"),
            (["embed", str(out), "--input", str(good), "--out", str(tmp_path / "e.zarr")],
             "protein-mlm writes .npz files (a .zarr or .nc dataset: weather-vit)"),
            (["embed", str(other), "--input", str(good), "--out", str(target)],
             "no checkpoint under " + str(other / "checkpoints"))):
        assert cli.main(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert match in err and "\n" not in err, (argv, err)
    assert not target.exists() and not list(tmp_path.glob("*.partial"))
