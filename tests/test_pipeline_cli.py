"""Training through the CLI's configs with a pipeline axis: resumes bit-identically, restores onto
a mesh without a pipeline axis, matches the unpipelined run; bad input gets one line before
anything compiles or is written."""

import dataclasses

import jax
import numpy as np
import pytest

from sciscale_jax import cli
from sciscale_jax.recipes import get_recipe
from sciscale_jax.train import train

TINY = ["--scan-layers", "--heads", "2", "--embed-dim", "16", "--mlp-dim", "32", "--max-len", "32", "--seq-len", "16",
        "--batch-size", "8", "--save-every", "2", "--eval-every", "1000", "--log-every", "1", "--warmup-steps", "1",
        "--schedule-steps", "4", "--seed", "1"]


def _run(out, steps, *flags, layers=3, resume=False):
    recipe, model_cfg, train_cfg = cli.build_configs(["protein-mlm", *TINY, "--layers", str(layers),
                                                      "--steps", str(steps), *flags])
    return train(recipe, model_cfg, train_cfg, out, resume=resume, progress=False, log=lambda *_: None)


def _same_bits(a, b):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def resume_check(tmp_path, flags, layers, reference=None, straight=None):
    straight = straight or _run(tmp_path / "straight", 4, *flags, layers=layers)
    _run(tmp_path / "split", 2, *flags, layers=layers)
    resumed = _run(tmp_path / "split", 4, *flags, layers=layers, resume=True)
    assert resumed["steps"] == 4
    _same_bits((resumed["state"].params, resumed["state"].opt_state),
               (straight["state"].params, straight["state"].opt_state))
    # the step-4 checkpoint onto a mesh without a pipeline axis: restored bit for bit, evaluated there
    plain = _run(tmp_path / "split", 4, "--mesh", "data=2", layers=layers, resume=True)
    _same_bits(plain["state"].params, straight["state"].params)
    assert plain["val_loss"] == pytest.approx(straight["val_loss"], rel=1e-5)
    if reference is not None:  # the same 4 steps without a pipeline
        for x, y in zip(jax.tree.leaves(straight["state"].params), jax.tree.leaves(reference["state"].params)):
            np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=2e-4, atol=1e-6)


PIPELINED = ["--mesh", "pipeline=2,data=2", "--pipeline-schedule", "1f1b", "--microbatches", "2"]


@pytest.fixture(scope="module")
def pipelined(tmp_path_factory):
    """4 steps of 1F1B on pipeline=2 x data=2, 3 layers over 2 stages (2 + 1: the layer axis stays
    replicated, the stages padded); shared by the resume and ZeRO tests."""
    return _run(tmp_path_factory.mktemp("pipelined") / "run", 4, *PIPELINED, layers=3)


def test_1f1b_data_x_pipeline_resumes_bit_identically_and_restores_without_pipeline(tmp_path, pipelined):
    reference = _run(tmp_path / "single", 4, layers=3)
    resume_check(tmp_path, PIPELINED, layers=3, reference=reference, straight=pipelined)


@pytest.mark.slow
@pytest.mark.parametrize("flags", [
    ["--mesh", "pipeline=2,data=2", "--pipeline-schedule", "gpipe", "--microbatches", "2"],
    ["--mesh", "pipeline=2,tensor=2", "--pipeline-schedule", "zbh1", "--microbatches", "4"],
    ["--mesh", "pipeline=2", "--pipeline-schedule", "interleaved", "--microbatches", "2", "--virtual-stages", "2"]])
def test_each_schedule_resumes_bit_identically(tmp_path, flags):
    resume_check(tmp_path, flags, layers=4)  # 4 layers: the layer axis splits over pipeline


def _cli_error(capsys, tmp_path, *flags):
    out = tmp_path / "run"
    code = cli.main(["train", "protein-mlm", *TINY, "--steps", "2", "--no-progress", "--out", str(out), *flags])
    err = capsys.readouterr().err.strip()
    assert code == 2 and not out.exists(), err
    assert len(err.splitlines()) == 1 and err.startswith("sciscale: error: ")
    return err


def test_bad_pipeline_input_is_one_line_before_compilation(capsys, tmp_path):
    err = _cli_error(capsys, tmp_path, "--mesh", "pipeline=2", "--pipeline-schedule", "pipedream")
    assert "invalid choice: 'pipedream'" in err and "1f1b" in err
    err = _cli_error(capsys, tmp_path, "--mesh", "pipeline=2", "--microbatches", "3")
    assert "microbatches=3 does not divide the batch size 8" in err
    err = _cli_error(capsys, tmp_path, "--mesh", "pipeline=4", "--layers", "3")
    assert "num_layers=3 is fewer than pipeline stages x virtual stages = 4 x 1 = 4" in err
    err = _cli_error(capsys, tmp_path, "--mesh", "pipeline=2", "--layers", "3", "--pipeline-schedule", "interleaved",
                     "--virtual-stages", "2")
    assert "num_layers=3 is fewer than pipeline stages x virtual stages = 2 x 2 = 4" in err
    err = _cli_error(capsys, tmp_path, "--mesh", "pipeline=2", "--virtual-stages", "2")
    assert "virtual_stages=2 needs pipeline_schedule 'interleaved'" in err
    err = _cli_error(capsys, tmp_path, "--mesh", "pipeline=2", "--no-scan-layers")
    assert "add --scan-layers" in err
    err = _cli_error(capsys, tmp_path, "--mesh", "pipeline=2", "--grad-accum", "2")
    assert "grad_accum=2 with pipeline=2" in err
    err = _cli_error(capsys, tmp_path, "--mesh", "pipeline=2,sequence=2")
    assert "mesh pipeline=2 with {'sequence': 2}: the pipeline composes only with the axes data, fsdp, tensor" in err


def test_recipe_without_stages_refuses_a_pipeline_axis(tmp_path):
    recipe, model_cfg, train_cfg = cli.build_configs(["protein-mlm", *TINY, "--steps", "1", "--mesh", "pipeline=2"])
    recipe = dataclasses.replace(recipe, pipeline=None)
    with pytest.raises(ValueError, match="recipe 'protein-mlm' gives no pipeline stages"):
        train(recipe, model_cfg, train_cfg, tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()
    assert get_recipe("smiles-lm").pipeline is not None and get_recipe("msa-evoformer").pipeline is not None


def _specs(tree):
    return {tuple(a for e in x.sharding.spec for a in ((e,) if isinstance(e, str) else (e or ())))
            for x in jax.tree.leaves(tree)}


@pytest.mark.parametrize("mesh,zero", [
    ("pipeline=2,data=2,fsdp=2", 3),
    pytest.param("pipeline=2,data=2", 1, marks=pytest.mark.slow),
    pytest.param("pipeline=2,data=2", 2, marks=pytest.mark.slow)])
def test_zero_with_pipeline_trains_like_the_plain_pipelined_run(tmp_path, pipelined, mesh, zero):
    """ZeRO-1/2/3 on a mesh with a pipeline axis (ZeRO-3 with fsdp too: parameters split over data
    and fsdp inside the stages) trains as the pipelined run without ZeRO does, with the optimizer
    state (and for ZeRO-3 the parameters) split over the data axes."""
    zeroed = _run(tmp_path / "zero", 4, *PIPELINED[2:], "--mesh", mesh, "--zero", str(zero), layers=3)
    for x, y in zip(jax.tree.leaves(zeroed["state"].params), jax.tree.leaves(pipelined["state"].params), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=2e-4, atol=1e-6)
    assert zeroed["train_loss"] == pytest.approx(pipelined["train_loss"], rel=1e-4)
    assert "data" in set().union(*_specs(zeroed["state"].opt_state))
    param_axes = set().union(*_specs(zeroed["state"].params))
    assert ("data" in param_axes) == (zero == 3)
    if zero == 3:
        assert "fsdp" in param_axes
        per_device = lambda tree: sum(x.addressable_shards[0].data.nbytes for x in jax.tree.leaves(tree))  # noqa: E731
        assert per_device(zeroed["state"].params) <= 0.3 * per_device(pipelined["state"].params)


def test_offloaded_optimizer_state_with_pipeline_trains_like_the_plain_pipelined_run(tmp_path, pipelined):
    """--offload opt_state on pipeline=2 x data=2: the optimizer state sits in pinned host memory
    between steps (with its pipeline placement) and the run trains as the pipelined run does.
    (XLA's CPU backend compiles the host transfers away; on GPU they are real copies.)"""
    off = _run(tmp_path / "offload", 4, *PIPELINED, "--offload", "opt_state", layers=3)
    for x, y in zip(jax.tree.leaves(off["state"].params), jax.tree.leaves(pipelined["state"].params), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=2e-4, atol=1e-6)
    assert off["train_loss"] == pytest.approx(pipelined["train_loss"], rel=1e-4)
    kinds = {x.sharding.memory_kind for x in jax.tree.leaves(off["state"].opt_state) if x.ndim}
    assert kinds == {"pinned_host"}, kinds
    assert {x.sharding.memory_kind for x in jax.tree.leaves(off["state"].params)} == {"device"}
