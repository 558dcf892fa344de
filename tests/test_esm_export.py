"""``sciscale export``: a protein-mlm run as Hugging Face's ``EsmForMaskedLM`` folder, or its LoRA
adapters alone in PEFT's layout (``models.esm.tensors`` / ``adapter_tensors``, the recipe's
``export``).

References: the ESM-2 fixture Hugging Face's transformers wrote itself (``tests/data/esm2_tiny``:
an unchanged model must come back as those very tensors), our reader (checked against Hugging
Face's logits in ``test_esm.py``) for the round trip of a trained model, and PEFT's documented
LoRA rule (a module's weight plus ``lora_alpha / r * lora_B @ lora_A``, modules chosen by
``re.fullmatch`` of ``target_modules``) applied here in numpy for the adapter files. Loading the
exports with transformers 5.24 and peft 0.21.2 themselves (not dependencies) gave the run's
logits within 2e-6 (README, "Exporting to Hugging Face").
"""

import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file

from sciscale_jax import cli
from sciscale_jax.data import ProteinTokenizer
from sciscale_jax.models import esm
from sciscale_jax.recipes import get_recipe, load_run
from sciscale_jax.train.load import load_checkpoint

from test_esm import FIXTURE, REF

RECIPE = get_recipe("protein-mlm")
TOKENS = ProteinTokenizer().tokens
QUIET = dict(log=lambda *_: None)
TRAIN = ["--steps", "3", "--batch-size", "4", "--seq-len", "48", "--eval-every", "100", "--no-progress"]


def _train(out, *flags):
    assert cli.main(["train", "protein-mlm", *TRAIN, "--out", str(out), *flags]) == 0
    return out


def _logits(model):
    return np.asarray(model(jnp.asarray(REF["our_ids"]), mask_bs=jnp.asarray(REF["mask"])))[..., :33]


def _canonical(tensors: dict) -> dict:
    """Tensor names without the ``esm.`` prefix, LayerNorm's older gamma/beta as weight/bias, the
    rotary buffers left out (transformers writes them in its own form)."""
    out = {}
    for name, value in tensors.items():
        if "inv_freq" in name:
            continue
        name = name.removeprefix("esm.").replace("LayerNorm.gamma", "LayerNorm.weight")
        out[name.replace("LayerNorm.beta", "LayerNorm.bias")] = value
    return out


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    """Three LoRA steps on all projections from the fixture, at a rate that moves the adapters."""
    return _train(tmp_path_factory.mktemp("lora") / "run", "--init-from", str(FIXTURE), "--lora-rank", "4",
                  "--lora-targets", "all", "--lr", "3e-2")


@pytest.mark.parametrize("scan_layers", [False, True])
def test_an_unchanged_model_exports_as_the_tensors_hugging_face_wrote(tmp_path, scan_layers):
    run = load_checkpoint(RECIPE, FIXTURE, scan_layers=scan_layers, **QUIET)
    params = jax.device_get(nnx.to_pure_dict(nnx.state(run.model, nnx.Param)))
    names = RECIPE.export(run.model_config, params, tmp_path / "hf", base=str(FIXTURE))
    assert names == ["config.json", "model.safetensors", "vocab.txt"]
    got, want = _canonical(load_file(tmp_path / "hf" / "model.safetensors")), _canonical(
        load_file(FIXTURE / "model.safetensors"))
    assert sorted(got) == sorted(want)  # the contact head carried over, nothing missing or extra
    for name in want:
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)
    written = load_file(tmp_path / "hf" / "model.safetensors")
    inv_freq = written["esm.encoder.layer.1.attention.self.rotary_embeddings.inv_freq"]
    np.testing.assert_allclose(inv_freq, 1.0 / 10000.0 ** (np.arange(0, 8, 2) / 8), rtol=1e-6)
    config, source = (json.loads((f / "config.json").read_text()) for f in (tmp_path / "hf", FIXTURE))
    assert {k: v for k, v in config.items() if k != "transformers_version"} == \
        {k: v for k, v in source.items() if k != "transformers_version"}
    assert (tmp_path / "hf" / "vocab.txt").read_text().split() == list(esm.vocabulary(FIXTURE))


def test_a_lora_run_exports_merged_and_its_adapters_follow_peft(lora_run, tmp_path, capsys, monkeypatch):
    from sciscale_jax.train import init_from

    run = load_run(lora_run, **QUIET)
    mine = _logits(run.model)
    assert cli.main(["export", str(lora_run), "--out", str(tmp_path / "merged")]) == 0

    def second_read(*_, **__):
        raise AssertionError("the base read again: loading the run just read its frozen weights from it")
    monkeypatch.setattr(init_from, "check_frozen_from", second_read)  # (a run on a fine-tuned base: compared)
    assert cli.main(["export", str(lora_run), "--out", str(tmp_path / "peft"), "--adapters"]) == 0
    assert f"wrote {tmp_path / 'peft'} on {FIXTURE}" in capsys.readouterr().out
    # the merged folder, read back, computes the run's logits; the base alone does not
    exported = _logits(load_checkpoint(RECIPE, tmp_path / "merged", **QUIET).model)
    real = REF["mask"]
    np.testing.assert_allclose(exported[real], mine[real], rtol=0, atol=2e-5)
    assert np.abs(_logits(load_checkpoint(RECIPE, FIXTURE, **QUIET).model)[real] - mine[real]).max() > 0.1
    # PEFT's rule on the base's tensors gives the merged tensors, module by module
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert (config["peft_type"], config["r"], config["lora_alpha"]) == ("LORA", 4, 8.0)
    assert config["base_model_name_or_path"] == str(FIXTURE)
    adapters = load_file(tmp_path / "peft" / "adapter_model.safetensors")
    base, merged = load_file(FIXTURE / "model.safetensors"), load_file(tmp_path / "merged" / "model.safetensors")
    modules = [n.removesuffix(".weight") for n in base if n.endswith(".weight") and "LayerNorm" not in n]
    targets = [m for m in modules if re.fullmatch(config["target_modules"], m)]
    assert len(targets) == 2 * 6  # query, key, value, attention output, intermediate, output in each layer
    assert not any(re.fullmatch(config["target_modules"], m) for m in ("lm_head.dense", "esm.contact_head.regression"))
    for module in targets:
        a = adapters[f"base_model.model.{module}.lora_A.weight"]
        b = adapters[f"base_model.model.{module}.lora_B.weight"]
        w = base[module + ".weight"]
        assert a.shape == (4, w.shape[1]) and b.shape == (w.shape[0], 4)
        assert np.abs(b).max() > 1e-3  # trained: B starts at zero
        np.testing.assert_allclose(w + config["lora_alpha"] / config["r"] * (b @ a), merged[module + ".weight"],
                                   rtol=0, atol=1e-6, err_msg=module)
    assert len(adapters) == 2 * len(targets)
    changed = {m.removeprefix("esm.") + ".weight" for m in targets}
    base, merged = _canonical(base), _canonical(merged)
    for name in base:  # everything else is the base, unchanged
        if name not in changed:
            np.testing.assert_array_equal(merged[name], base[name], err_msg=name)


def test_qlora_exports_the_weights_it_computed_with(tmp_path):
    run_dir = _train(tmp_path / "q", "--init-from", str(FIXTURE), "--lora-rank", "4", "--lora-quant", "nf4-dq",
                     "--lr", "3e-2")
    run = load_run(run_dir, **QUIET)
    assert cli.main(["export", str(run_dir), "--out", str(tmp_path / "hf")]) == 0
    exported = load_checkpoint(RECIPE, tmp_path / "hf", **QUIET).model
    real = REF["mask"]
    np.testing.assert_allclose(_logits(exported)[real], _logits(run.model)[real], rtol=0, atol=2e-5)
    # the kernels are the 4-bit ones, not the float base's: a query kernel moved by the rounding
    base = load_file(FIXTURE / "model.safetensors")["esm.encoder.layer.0.attention.self.key.weight"]
    got = load_file(tmp_path / "hf" / "model.safetensors")["esm.encoder.layer.0.attention.self.key.weight"]
    assert 1e-3 < np.abs(got - base).max() < 0.5 * np.abs(base).max()


def test_bfloat16_export_holds_the_float32_tensors_rounded(lora_run, tmp_path):
    import ml_dtypes

    assert cli.main(["export", str(lora_run), "--out", str(tmp_path / "f32")]) == 0
    assert cli.main(["export", str(lora_run), "--out", str(tmp_path / "bf16"), "--dtype", "bfloat16"]) == 0
    full, half = (load_file(tmp_path / f / "model.safetensors") for f in ("f32", "bf16"))
    for name, value in full.items():
        assert half[name].dtype == ml_dtypes.bfloat16
        np.testing.assert_array_equal(half[name], value.astype(ml_dtypes.bfloat16), err_msg=name)
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["dtype"] == "bfloat16"


def test_refusals_leave_nothing_written(lora_run, tmp_path, capsys):
    from sciscale_jax.train import TrainConfig, train

    settings = esm.settings(FIXTURE, TOKENS)
    full = _train(tmp_path / "full", "--init-from", str(FIXTURE), "--steps", "1", "--lr", "1e-2")
    on_full = tmp_path / "onfull"  # LoRA on a model fine-tuned from ESM-2: its base is not ESM-2's
    train(RECIPE, RECIPE.make_config(**settings, lora_rank=4), TrainConfig(steps=1, batch_size=4, seq_len=48,
          eval_every=100, init_from=str(full)), on_full, progress=False, log=lambda *_: None)
    other = tmp_path / "smiles"
    other.mkdir()
    (other / "run_config.json").write_text(json.dumps({"recipe": "smiles-lm", "model": {}, "train": {}}))
    taken = tmp_path / "taken"
    taken.mkdir()
    cases = [
        (["export", str(full), "--out", str(tmp_path / "b"), "--adapters"], "the run has no LoRA adapters"),
        (["export", str(on_full), "--out", str(tmp_path / "c"), "--adapters"],
         f"is not {FIXTURE}'s .*export the whole model instead"),
        (["export", str(lora_run), "--out", str(taken)], f"--out {taken} exists"),
        (["export", str(FIXTURE), "--out", str(tmp_path / "f")], "a checkpoint of another library already"),
        (["export", str(other), "--out", str(tmp_path / "h")], "recipe 'smiles-lm' has no export layout"),
    ]
    for argv, message in cases:
        assert cli.main(argv) == 2, argv
        err = capsys.readouterr().err
        assert re.search(message, err) and err.count("\n") == 1, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["full", "onfull", "smiles", "taken"]
    # the recipe's own refusals, before anything is written
    for overrides, kw, message in (
            ({}, {}, "not exportable as an ESM-2 checkpoint: norm='rms'"),  # protein-mlm's defaults
            ({**settings, "mlp": "swiglu"}, {}, "mlp='swiglu'"),
            ({**settings, "causal": True, "token_dropout_id": -1}, {}, "causal=True"),
            ({**settings, "quant": "bitnet158"}, {}, "quant='bitnet158'"),
            ({**settings, "lora_rank": 4, "lora_train": "esm_head"}, {"base": str(FIXTURE), "adapters": True},
             "lora_train='esm_head' trained weights beside the adapters"),
            ({**settings, "lora_rank": 4}, {"adapters": True}, "did not start from an ESM-2 checkpoint")):
        with pytest.raises(ValueError, match=re.escape(message)):
            RECIPE.export(RECIPE.make_config(**overrides), {}, tmp_path / "x", **kw)
    assert not (tmp_path / "x").exists()
    # the whole model of a LoRA run on a fine-tuned base exports (its merged weights), and reads back
    assert cli.main(["export", str(on_full), "--out", str(tmp_path / "g")]) == 0
    real = REF["mask"]
    np.testing.assert_allclose(_logits(load_checkpoint(RECIPE, tmp_path / "g", **QUIET).model)[real],
                               _logits(load_run(on_full, **QUIET).model)[real], rtol=0, atol=2e-5)


def test_a_killed_export_leaves_no_folder_and_the_next_one_completes(lora_run, tmp_path, monkeypatch):
    from safetensors import numpy as st

    def killed(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(st, "save_file", killed)
    with pytest.raises(KeyboardInterrupt):
        cli.main(["export", str(lora_run), "--out", str(tmp_path / "hf"), "--debug"])
    assert not (tmp_path / "hf").exists() and (tmp_path / "hf.partial").is_dir()
    monkeypatch.undo()
    assert cli.main(["export", str(lora_run), "--out", str(tmp_path / "hf")]) == 0
    assert sorted(p.name for p in (tmp_path / "hf").iterdir()) == ["config.json", "model.safetensors", "vocab.txt"]
    assert not (tmp_path / "hf.partial").exists()
