"""ESM-2 checkpoints as protein-mlm models (``sciscale_jax.models.esm``, ``--init-from``,
``sciscale embed <checkpoint>``).

The reference is Hugging Face's own ``EsmForMaskedLM`` (transformers 5.24, torch 2.13, float32):
``tests/data/make_esm2_fixture.py`` built a small ESM-2 with random weights (norms and biases
drawn away from 1 and 0, so every part moves the output), saved it in the layout ESM-2 is
published in and recorded its logits, final hidden states, a masked-LM loss and that loss's
gradients on inputs with padding, mask tokens (token dropout) and the rare residues B Z U O X.
"""

import dataclasses
import json
import pathlib
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sciscale_jax import cli
from sciscale_jax.data import ProteinTokenizer
from sciscale_jax.models import Transformer, esm
from sciscale_jax.recipes import get_recipe
from sciscale_jax.train import TrainConfig, train
from sciscale_jax.train.load import load_checkpoint

FIXTURE = pathlib.Path(__file__).parent / "data" / "esm2_tiny"
RECIPE = get_recipe("protein-mlm")
TOKENS = ProteinTokenizer().tokens
REF = np.load(FIXTURE / "expected.npz")
ESM_ROWS = esm.rows(TOKENS, esm.vocabulary(FIXTURE))  # our row i holds ESM's row ESM_ROWS[i]
TOL = 3e-5  # float32 logits of size ~3: 2e-6 apart here; the tanh GELU (a control below) is 7e-4 off


def _model(path=FIXTURE, **overrides):
    return load_checkpoint(RECIPE, path, log=lambda *_: None, **overrides).model


def _logits(model):
    return np.asarray(model(jnp.asarray(REF["our_ids"]), mask_bs=jnp.asarray(REF["mask"])))


@pytest.mark.parametrize("scan_layers", [False, True])
def test_logits_and_hidden_states_are_hugging_faces(scan_layers):
    model = _model(scan_layers=scan_layers)
    real = REF["mask"]
    logits = _logits(model)
    want = REF["logits"][..., ESM_ROWS]  # Hugging Face's 33 columns in our row order
    np.testing.assert_allclose(logits[..., :33][real], want[real], rtol=0, atol=TOL)
    # the rows past ESM's take no probability: the softmax is Hugging Face's over its 33 tokens
    ours = jax.nn.log_softmax(logits, axis=-1)[..., :33]
    np.testing.assert_allclose(np.asarray(ours)[real], np.asarray(jax.nn.log_softmax(want, axis=-1))[real],
                               rtol=0, atol=TOL)
    hidden = np.asarray(model.hidden(jnp.asarray(REF["our_ids"]), mask_bs=jnp.asarray(REF["mask"])))
    np.testing.assert_allclose(hidden[real], REF["hidden"][real], rtol=0, atol=TOL)
    assert np.abs(want[real]).max() > 1.0  # the logits are not near zero: the comparison has a signal


@pytest.mark.parametrize("change", [dict(token_dropout_id=-1), dict(mlp="gelu")])
def test_the_reference_tells_near_misses_apart(change):
    """The same weights with token dropout off or jax's default (tanh) GELU miss Hugging Face's logits
    by more than the tolerance: ESM-2 scales every embedding by 0.88 / (1 - share of mask tokens) and
    zeroes the mask tokens' (two sequences hold mask tokens, one none), and uses the erf GELU."""
    loaded = load_checkpoint(RECIPE, FIXTURE, log=lambda *_: None)
    plain = Transformer(dataclasses.replace(loaded.model_config, **change), rngs=nnx.Rngs(0))
    nnx.update(plain, nnx.state(loaded.model, nnx.Param))
    logits, want, real = _logits(plain)[..., :33], REF["logits"][..., ESM_ROWS], REF["mask"]
    assert ((REF["our_ids"] == ProteinTokenizer().mask_id).sum(axis=1) > 0).tolist() == [False, True, True]
    for row in range(3) if "token_dropout_id" in change else (0,):
        assert np.abs(logits[row][real[row]] - want[row][real[row]]).max() > 10 * TOL


def test_loss_gradients_are_hugging_faces():
    model = _model()
    params = nnx.state(model, nnx.Param)
    graphdef, _, rest = nnx.split(model, nnx.Param, ...)
    targets, weights = jnp.asarray(REF["targets"]), jnp.asarray(REF["weights"])

    def loss(p):
        m = nnx.merge(graphdef, p, rest)
        logp = jax.nn.log_softmax(m(jnp.asarray(REF["our_ids"]), mask_bs=jnp.asarray(REF["mask"])), axis=-1)
        return -jnp.sum(jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0] * weights)

    value, grads = jax.value_and_grad(loss)(params)
    grads = nnx.to_pure_dict(grads) if hasattr(nnx, "to_pure_dict") else grads.to_pure_dict()
    assert float(value) == pytest.approx(float(REF["loss"]), rel=1e-5)
    e, h, d = 32, 4, 8

    def close(ours, theirs):
        ours, theirs = np.asarray(ours), np.asarray(theirs)
        scale = np.abs(theirs).max()
        assert scale > 1e-3
        np.testing.assert_allclose(ours, theirs, rtol=0, atol=2e-4 * scale)

    close(grads["embed"][:33], REF["grad_embed"][ESM_ROWS])
    close(grads["layers"][0]["attn"]["query"]["kernel"], REF["grad_query0"].T.reshape(e, h, d))
    close(grads["layers"][1]["attn"]["query"]["bias"], REF["grad_query_bias1"].reshape(h, d))
    close(grads["esm_head"]["norm"]["scale"], REF["grad_head_norm"])
    close(grads["esm_head"]["bias"][:33], REF["grad_head_bias"][ESM_ROWS])
    assert np.abs(np.asarray(grads["esm_head"]["bias"][33:])).max() == 0.0  # padding rows: no probability


def test_sharded_load_computes_the_single_device_logits():
    ids, mask = (jnp.asarray(np.concatenate([REF[k], REF[k][:1]])) for k in ("our_ids", "mask"))  # 4 rows: fsdp=2
    one = np.asarray(_model()(ids, mask_bs=mask))
    sharded = load_checkpoint(RECIPE, FIXTURE, mesh="fsdp=2,tensor=2", log=lambda *_: None)
    kernel = sharded.model.layers[0].mlp.wi.kernel[...]
    assert len({s.device for s in kernel.addressable_shards}) == 4
    assert kernel.addressable_shards[0].data.size == kernel.size // 4  # split, not whole on every device
    with sharded.on_mesh():
        logits = np.asarray(sharded.model(ids, mask_bs=mask))
    np.testing.assert_allclose(logits, one, rtol=1e-5, atol=1e-5)


def _rewrite(tmp_path, change=None, *, config=None, name="model.safetensors"):
    """A copy of the fixture with its tensors passed through ``change(dict) -> dict`` and its config
    through ``config(dict) -> dict``."""
    from safetensors.numpy import load_file, save_file

    folder = tmp_path / "esm"
    shutil.copytree(FIXTURE, folder)
    if change is not None:
        tensors = change(load_file(FIXTURE / "model.safetensors"))
        (folder / "model.safetensors").unlink()
        if isinstance(tensors, list):  # shards, with Hugging Face's index
            index = {}
            for i, shard in enumerate(tensors):
                file = f"model-{i + 1:05d}-of-{len(tensors):05d}.safetensors"
                save_file(shard, folder / file)
                index.update({k: file for k in shard})
            (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": index}))
        else:
            save_file(tensors, folder / name)
    if config is not None:
        (folder / "config.json").write_text(json.dumps(config(json.loads((FIXTURE / "config.json").read_text()))))
    return folder


def test_older_names_a_stored_decoder_and_shards_read_the_same(tmp_path):
    """Published ESM-2 checkpoints name LayerNorm parameters weight/bias (this transformers writes
    gamma/beta), some store the tied decoder, large ones come in shards."""
    def older(tensors):
        out = {k.replace(".gamma", ".weight").replace(".beta", ".bias"): v for k, v in tensors.items()}
        out["lm_head.decoder.weight"] = out["esm.embeddings.word_embeddings.weight"].copy()
        keys = sorted(out)
        return [{k: out[k] for k in keys[:20]}, {k: out[k] for k in keys[20:]}]

    folder = _rewrite(tmp_path, older)
    assert not (folder / "model.safetensors").exists()
    np.testing.assert_allclose(_logits(_model(folder)), _logits(_model()), rtol=0, atol=0)


BAD = [
    (lambda t: {k: v for k, v in t.items() if "layer.1.output.dense.bias" not in k}, None,
     "no tensor 'encoder.layer.1.output.dense.bias'"),
    (lambda t: {**t, "esm.encoder.layer.0.intermediate.dense.weight": np.ones((40, 32), np.float32)}, None,
     "encoder.layer.0.intermediate.dense.weight has shape (32, 40), the model needs (32, 48)"),
    (lambda t: {**t, "lm_head.decoder.weight": t["esm.embeddings.word_embeddings.weight"] + 1}, None,
     "an untied head"),
    (None, lambda c: {**c, "position_embedding_type": "absolute"}, "ESM-1b/ESM-1v"),
    (None, lambda c: {**c, "model_type": "bert"}, "not an ESM model"),
    (None, lambda c: {**c, "num_hidden_layers": 1}, "holds more layers than config.json's num_hidden_layers=1"),
    (lambda t: {**t, "esm.embeddings.word_embeddings.weight": np.ones((33, 32), np.int32)}, None,
     "is int32, not floating point"),
]


@pytest.mark.parametrize("change, config, message", BAD)
def test_bad_checkpoints_are_refused_in_one_line(tmp_path, change, config, message):
    folder = _rewrite(tmp_path, change, config=config)
    with pytest.raises(ValueError, match="^[^\n]*" + message.replace("(", r"\(").replace(")", r"\)")):
        _model(folder)


def test_torch_pickles_and_foreign_vocabularies_are_refused(tmp_path):
    folder = tmp_path / "torch"
    folder.mkdir()
    shutil.copy(FIXTURE / "config.json", folder)
    (folder / "pytorch_model.bin").write_bytes(b"not read")
    with pytest.raises(ValueError, match="pytorch_model.bin: PyTorch pickles.*save_pretrained"):
        _model(folder)
    vocab = _rewrite(tmp_path / "v", None)
    (vocab / "vocab.txt").write_text((FIXTURE / "vocab.txt").read_text().replace("\nO\n", "\nJ\n"))
    with pytest.raises(ValueError, match=r"vocabulary lacks \['O'\]"):
        _model(vocab)


@pytest.mark.parametrize("lora", [False, True, "nf4"])
def test_cli_trains_from_esm2_and_the_first_step_scores_the_checkpoint(tmp_path, capsys, monkeypatch, lora):
    from flax import traverse_util

    out = tmp_path / "tuned"
    if not lora:  # a relative --init-from, recorded absolute (the resume below runs from elsewhere)
        monkeypatch.chdir(FIXTURE.parent)
    source = FIXTURE.name if not lora else str(FIXTURE)
    args = ["train", "protein-mlm", "--init-from", source, "--steps", "2", "--batch-size", "4", "--seq-len",
            "48", "--eval-every", "100", "--log-every", "1", "--out", str(out), "--no-progress"]
    args += ["--lora-rank", "4", "--lr", "1e-2"] if lora else []
    args += ["--lora-quant", "nf4"] if lora == "nf4" else []
    assert cli.main(args) == 0
    saved = json.loads((out / "run_config.json").read_text())
    assert {k: saved["model"][k] for k in esm.settings(FIXTURE, TOKENS)} == esm.settings(FIXTURE, TOKENS)
    assert saved["train"]["init_from"] == str(FIXTURE) and saved["train"]["init_step"] == 0
    flat = lambda m: traverse_util.flatten_dict(nnx.to_pure_dict(nnx.state(m, nnx.Param)))  # noqa: E731
    start = _model()
    if lora == "nf4":  # QLoRA: the blocks' kernels as the float64 reference quantises and dequantises them
        from sciscale_jax.recipes import load_run

        import nf4_reference as nf4_ref

        tuned = flat(load_run(out, log=lambda *_: None).model)
        stored = {p[:-1] for p in tuned if p[-1] == "kernel_nf4"}
        assert stored == {p[:-1] for p in flat(start) if p[0] == "layers" and p[-1] == "kernel"}
        round_trip = {}
        for at in stored:
            w, absmax = np.asarray(flat(start)[at + ("kernel",)]), np.asarray(tuned[at + ("kernel_absmax",)])
            codes, want_absmax, scaled = nf4_ref.quantize(w, w.shape[-1] // absmax.shape[-1])
            assert not np.any((nf4_ref.unpack(tuned[at + ("kernel_nf4",)]) != codes) & ~nf4_ref.near_a_midpoint(scaled))
            round_trip[at + ("kernel",)] = nf4_ref.dequantize(codes, want_absmax).astype(np.float32)
        nnx.update(start, nnx.State(traverse_util.unflatten_dict(round_trip)))
    # the first step's loss is the checkpoint's on the first batch (the model Hugging Face's logits check)
    recipe, model_cfg, train_cfg = cli.build_configs(args[1:])
    batch = jax.tree.map(np.asarray, recipe.build_data(train_cfg, model_cfg).train.batch(0))
    total, count = recipe.loss_fn(start, batch, None)
    first = next(json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()
                 if json.loads(line).get("step") == 1 and "loss" in json.loads(line))
    assert first == pytest.approx(float(total) / float(count), rel=1e-5)
    if lora is True:  # LoRA: ESM-2's every weight as read, trained adapters beside them
        from sciscale_jax.models.stack import is_lora
        from sciscale_jax.recipes import load_run

        tuned, start = flat(load_run(out, log=lambda *_: None).model), flat(_model())
        assert {p for p in tuned if not is_lora(p)} == set(start)
        assert all(np.array_equal(tuned[p], start[p]) for p in start)
        assert all(np.abs(tuned[p]).max() > 0 for p in tuned if p[-1] == "lora_b")
    if lora:  # the run's checkpoints hold its adapters alone: ESM-2's weights are read again from its folder
        from sciscale_jax.train.checkpoint import _saved_signature

        names = [n for n in _saved_signature(out / "checkpoints" / "2") if n.startswith("params/")]
        assert names and all(n.endswith(("lora_a", "lora_b")) for n in names)
        return
    # resumed from another directory without repeating --init-from: the shape comes from where the run started
    monkeypatch.chdir(tmp_path)
    assert cli.main(["train", "protein-mlm", "--steps", "3", "--batch-size", "4", "--seq-len", "48", "--eval-every",
                     "100", "--out", str(out), "--resume", "--no-progress"]) == 0
    capsys.readouterr()
    assert cli.main(["train", "protein-mlm", "--init-from", str(FIXTURE), "--embed-dim", "64", "--out",
                     str(tmp_path / "x")]) == 2
    assert "--embed-dim 64: --init-from" in capsys.readouterr().err and not (tmp_path / "x").exists()


def test_python_api_config_must_match_the_checkpoint(tmp_path):
    model_cfg = RECIPE.make_config(**{**esm.settings(FIXTURE, TOKENS), "num_heads": 2})
    cfg = TrainConfig(steps=1, batch_size=4, seq_len=32, init_from=str(FIXTURE))
    with pytest.raises(ValueError, match="has num_heads=4; the model has num_heads=2"):
        train(RECIPE, model_cfg, cfg, tmp_path / "run", progress=False, log=lambda *_: None)


def test_cli_embed_reads_the_checkpoint_directly(tmp_path, capsys):
    fasta = tmp_path / "p.fasta"
    fasta.write_text(">first\nMKTAYIAKQRQISFVKSHFSRQ\n")
    assert cli.main(["embed", str(FIXTURE), "--input", str(fasta), "--out", str(tmp_path / "e.npz")]) == 0
    assert "read as protein-mlm" in capsys.readouterr().out
    got = np.load(tmp_path / "e.npz")
    length = len("MKTAYIAKQRQISFVKSHFSRQ")
    np.testing.assert_allclose(got["per_residue"], REF["hidden"][0, 1:1 + length], rtol=1e-4, atol=1e-4)
    assert cli.main(["embed", str(FIXTURE), "--input", str(fasta), "--out", str(tmp_path / "f.npz"),
                     "--step", "3"]) == 2
    assert "no numbered checkpoints" in capsys.readouterr().err


def test_cli_eval_and_load_run_read_the_checkpoint(tmp_path, capsys, monkeypatch):
    """``sciscale eval <checkpoint>`` scores ESM-2 on the held-out proteins as a run's checkpoint is
    scored: its masked-position loss equals the recipe's metrics of the loaded model over the
    evaluation batches, computed here by hand. (The recipe's budget of masked validation targets
    is cut from 20,000 to 500: six held-out proteins would otherwise be scored over ~480 passes.)"""
    from sciscale_jax.recipes import load_run, protein_mlm

    monkeypatch.setattr(protein_mlm, "EVAL_MIN_MASKED", 500)

    fasta = tmp_path / "p.fasta"
    rng = np.random.default_rng(0)
    fasta.write_text("".join(f">p{i}\n{''.join(rng.choice(list('ACDEFGHIKLMNPQRSTVWY'), 60))}\n" for i in range(60)))
    report = tmp_path / "eval.json"
    assert cli.main(["eval", str(FIXTURE), "--data", str(fasta), "--json", str(report)]) == 0
    assert capsys.readouterr().out.startswith(f"checkpoint {FIXTURE}: read as protein-mlm")
    figures = json.loads(report.read_text())["validation"]
    run = load_run(FIXTURE, data=str(fasta), log=lambda *_: None)
    assert run.step == 0 and run.model_config.num_layers == 2
    data = run.build_data()
    sums, metrics = {}, nnx.jit(RECIPE.eval_fn)
    for batch in data.eval:
        for name, (total, count) in metrics(run.model, jax.tree.map(jnp.asarray, batch)).items():
            a, b = sums.get(name, (0.0, 0.0))
            sums[name] = (a + float(total), b + float(count))
    assert figures["val_loss"] == pytest.approx(sums["loss"][0] / sums["loss"][1], rel=1e-5)
    with pytest.raises(ValueError, match="no numbered checkpoints"):
        load_run(FIXTURE, step=1)
    # --seq-len / --batch-size: the batches a training run of those settings would evaluate
    assert cli.main(["eval", str(FIXTURE), "--data", str(fasta), "--seq-len", "32", "--batch-size", "4",
                     "--json", str(report)]) == 0
    shorter = json.loads(report.read_text())["validation"]
    sums = {}
    for batch in RECIPE.build_data(TrainConfig(batch_size=4, seq_len=32), run.model_config).eval:
        assert batch["inputs"].shape[1] == 32
        for name, (total, count) in metrics(run.model, jax.tree.map(jnp.asarray, batch)).items():
            a, b = sums.get(name, (0.0, 0.0))
            sums[name] = (a + float(total), b + float(count))
    assert shorter["val_loss"] == pytest.approx(sums["loss"][0] / sums["loss"][1], rel=1e-5)
    assert shorter["val_loss"] != pytest.approx(figures["val_loss"], rel=1e-4)
    capsys.readouterr()
    for bad, message in ((["--seq-len", "0"], "--seq-len 0 must be a positive integer"),
                         (["--seq-len", "5000"], "seq_len=5000 exceeds the model's max_len")):
        assert cli.main(["eval", str(FIXTURE), "--data", str(fasta), *bad]) == 2
        assert message in capsys.readouterr().err


def test_bfloat16_checkpoints_read_as_their_float32_values(tmp_path):
    """A checkpoint saved in bfloat16 (safetensors' BF16) reads as those values in float32."""
    import ml_dtypes

    folder = _rewrite(tmp_path, lambda t: {k: v.astype(ml_dtypes.bfloat16) for k, v in t.items()})
    rounded = _rewrite(tmp_path / "r", lambda t: {k: v.astype(ml_dtypes.bfloat16).astype(np.float32)
                                                   for k, v in t.items()})
    got, want = (nnx.state(_model(f), nnx.Param) for f in (folder, rounded))
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert np.abs(_logits(_model(folder)) - _logits(_model()))[REF["mask"]].max() > 1e-4  # it was rounded


CONTACTS = np.load(FIXTURE / "expected_contacts.npz")  # Hugging Face's predict_contacts (make_esm2_fixture.py)


@pytest.mark.parametrize("scan_layers", [False, True])
def test_attention_maps_and_contacts_are_hugging_faces(scan_layers):
    """Every layer's attention probabilities and ESM-2's contact head (symmetrised, APC-corrected
    maps through the checkpoint's regression) against Hugging Face's on inputs with padding and
    mask tokens; the batch's padding changes no protein's map (each equals the protein alone)."""
    from sciscale_jax.models import attention_maps

    model = _model(scan_layers=scan_layers)
    ids, mask = jnp.asarray(REF["our_ids"]), jnp.asarray(REF["mask"])
    maps = np.stack(attention_maps(model, ids, mask_bs=mask), axis=1)  # [batch, layer, head, query, key]
    real = REF["mask"][:, None, None, :, None] & REF["mask"][:, None, None, None, :]
    np.testing.assert_allclose(np.where(real, maps, 0), np.where(real, CONTACTS["attentions"], 0), rtol=0, atol=1e-5)
    assert np.all(maps[~np.broadcast_to(real, maps.shape) & REF["mask"][:, None, None, :, None]] == 0)  # no padding key
    head = esm.contact_head(FIXTURE, model.config)
    got = np.asarray(esm.contacts(model, ids, mask, head, eos_id=ProteinTokenizer().eos_id))
    spread = 0.0
    for i in range(len(ids)):
        n = int(REF["mask"][i].sum()) - 2
        want = CONTACTS[f"alone_{i}"]
        np.testing.assert_allclose(got[i, 1:n + 1, 1:n + 1], want, rtol=0, atol=1e-5)
        np.testing.assert_allclose(want, want.T, atol=1e-6)  # symmetric, as the head makes it
        spread = max(spread, float(want.max() - want.min()))
    # the tolerance tells the head's parts apart: without the average-product correction (from
    # the reference's own maps) the contacts of the first protein move by far more than 1e-5
    a = CONTACTS["attentions"][0, :, :, 1:23, 1:23].reshape(-1, 22, 22)
    a = a + np.swapaxes(a, -1, -2)
    weight, bias = head
    no_apc = 1 / (1 + np.exp(-(np.einsum("cqk,c->qk", a, weight.ravel()) + bias)))
    assert np.abs(no_apc - CONTACTS["alone_0"]).max() > 1e-3 and spread > 0.05


def test_cli_embed_writes_contacts(tmp_path, capsys):
    fasta = tmp_path / "p.fasta"
    other = "".join(np.random.default_rng(1).choice(list("ACDEFGHIKLMNPQRSTVWY"), 40))
    fasta.write_text(f">first\nMKTAYIAKQRQISFVKSHFSRQ\n>other\n{other}\n")  # batched together: padding
    assert cli.main(["embed", str(FIXTURE), "--input", str(fasta), "--out", str(tmp_path / "e.npz"), "--contacts"]) == 0
    got = np.load(tmp_path / "e.npz")
    np.testing.assert_array_equal(got["contact_offsets"], [0, 22 * 22, 22 * 22 + 40 * 40])
    np.testing.assert_allclose(got["contacts"][:22 * 22].reshape(22, 22), CONTACTS["alone_0"], rtol=0, atol=1e-5)
    capsys.readouterr()
    assert cli.main(["embed", str(FIXTURE), "--input", str(fasta), "--out", str(tmp_path / "f.npz"), "--contact"]) == 2
    assert "unrecognized arguments: --contact (protein-mlm's embed switches: --contacts)" in capsys.readouterr().err
    model = _model()
    with pytest.raises(ValueError, match="--contacts needs ESM-2's contact head .* did not start from an ESM-2"):
        RECIPE.embed(model.config, model, str(fasta), contacts=True, base=None)
    folder = _rewrite(tmp_path, lambda t: {k: v for k, v in t.items() if "contact_head" not in k})
    with pytest.raises(ValueError, match=f"the ESM-2 checkpoint {folder} holds none for 2 layers x 4 heads"):
        RECIPE.embed(model.config, model, str(fasta), contacts=True, base=str(folder))
    assert not (tmp_path / "f.npz").exists()
