"""LoRA on the Evoformer (``lora_rank``): adapters beside the blocks' attention projections (and,
with ``lora_targets="all"``, beside every Linear of the blocks) give the outputs of the same model
whose weights are W + scale * A B, formed here in float64 from the parameters; on a DAP mesh they
give the one-device loss and gradients; a msa-evoformer run started from a pretrained one trains
the adapters alone, keeps the pretrained weights bit for bit and loads back."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sciscale_jax import cli
from sciscale_jax.models.evoformer import Evoformer, EvoformerStack
from sciscale_jax.models.evoformer_params import export_alphafold_evoformer, load_alphafold_evoformer
from sciscale_jax.models.stack import is_lora, without_lora
from sciscale_jax.parallel import ParallelConfig, make_mesh
from test_dap import _loss_grad_fn
from test_evoformer import assert_close, make_inputs, perturb, small_config

ATTENTION = ("query_w", "key_w", "value_w", "output_w")


def _flat(module) -> dict:
    return {tuple(map(str, p)): np.asarray(v[...]) for p, v in nnx.to_flat_state(nnx.state(module, nnx.Param))}


def _merged_by_hand(model, plain):
    """``plain`` (the model without adapters) given the LoRA model's weights with every adapter
    ``<w>_lora`` folded into its sibling ``<w>`` in float64."""
    cfg, weights = model.config, _flat(model)
    values = {}
    for path, value in _flat(plain).items():
        w = weights[path].astype(np.float64)
        if path[:-1] + (path[-1] + "_lora", "lora_a") in weights:
            a = weights[path[:-1] + (path[-1] + "_lora", "lora_a")].astype(np.float64)
            b = weights[path[:-1] + (path[-1] + "_lora", "lora_b")].astype(np.float64)
            lead = a.ndim + b.ndim - w.ndim - 2  # stacked blocks: a leading layers axis on all three
            a2, b2 = a.reshape(*a.shape[:lead], -1, a.shape[-1]), b.reshape(*b.shape[:lead + 1], -1)
            w = w + cfg.lora_scale * (a2 @ b2).reshape(w.shape)
        values[path] = w.astype(np.float32)
    state = nnx.state(plain, nnx.Param)
    for path, variable in nnx.to_flat_state(state):
        variable[...] = values[tuple(map(str, path))]
    nnx.update(plain, state)
    return plain


def _inputs(cfg, seed=0):
    rng = np.random.default_rng(seed)
    b, s, r = 2, 4, 7
    seq_mask = np.ones((b, r), np.float32)
    seq_mask[1, -2:] = 0
    msa_mask = seq_mask[:, None, :] * np.ones((b, s, 1), np.float32)
    return (rng.normal(size=(b, r, cfg.target_feat_dim)).astype(np.float32),
            rng.normal(size=(b, s, r, cfg.msa_feat_dim)).astype(np.float32),
            np.tile(np.arange(r, dtype=np.int32), (b, 1)), msa_mask, seq_mask,
            rng.normal(size=(b, 3, r, cfg.extra_msa_feat_dim)).astype(np.float32), np.ones((b, 3, r), np.float32))


@pytest.mark.parametrize("targets", ["attention", "all"])
def test_adapters_sit_beside_the_weights_lora_targets_names(targets):
    abstract = nnx.eval_shape(lambda: Evoformer(small_config(num_blocks=2, num_extra_blocks=1, lora_rank=3,
                                                             lora_targets=targets), rngs=nnx.Rngs(0)))
    paths = [tuple(map(str, p)) for p, _ in nnx.to_flat_state(nnx.state(abstract, nnx.Param))]
    adapted = {(p[-3], p[-2][:-5]) for p in paths if p[-1] == "lora_a"}
    attention = {(m, w) for m, w in adapted if w in ATTENTION}
    assert {w for _, w in attention} == set(ATTENTION) and {m for m, _ in attention} == {"attention"}
    assert any(p[0] == "extra_msa_stack" and "msa_column_global_attention" in p and p[-1] == "lora_a" for p in paths)
    dense = adapted - attention
    assert all(w == "weights" for _, w in dense)
    want_dense = {"transition1", "transition2", "left_projection", "right_projection", "left_gate", "right_gate",
                  "output_projection", "gating_linear"}
    assert {m for m, _ in dense} == (want_dense if targets == "all" else set())
    assert not any("embedder" in p or "head" in p[0] or "gating_w" in p[-2] for p in paths if is_lora(p))


def test_adapters_equal_the_merged_weights():
    """Every target (all), scanned blocks and the extra-MSA stack's global column attention."""
    cfg = small_config(num_blocks=2, num_extra_blocks=1, lora_rank=3, lora_alpha=6.0, lora_targets="all",
                       scan_layers=True)
    model = perturb(Evoformer(cfg, rngs=nnx.Rngs(0)), 1)  # every parameter, the zero B factors too
    t, msa, res, msa_mask, seq_mask, extra_feat, extra_mask = _inputs(cfg)
    run = lambda mdl: mdl(t, msa, res, msa_mask, seq_mask, extra_msa_feat=extra_feat,  # noqa: E731
                          extra_msa_mask=extra_mask)
    out = run(model)
    plain = _merged_by_hand(model, Evoformer(dataclasses.replace(cfg, lora_rank=0), rngs=nnx.Rngs(5)))
    expected = run(plain)
    for name in ("msa", "pair", "masked_msa_logits"):
        assert_close(out[name], np.asarray(expected[name], np.float64), rtol=2e-5)
    folded = run(without_lora(model))  # the library's fold gives the same model
    for name in ("msa", "pair"):
        assert_close(folded[name], np.asarray(expected[name], np.float64), rtol=2e-5)
    zeroed = nnx.state(model, nnx.Param)  # the adapters matter: without them the outputs move
    for path, variable in nnx.to_flat_state(zeroed):
        if str(path[-1]) == "lora_b":
            variable[...] = np.zeros(variable[...].shape, np.float32)
    nnx.update(model, zeroed)
    assert np.abs(np.asarray(run(model)["pair"]) - np.asarray(out["pair"])).max() > 1e-2


def test_alphafold_parameters_load_beside_adapters_and_export_refuses_them():
    cfg = small_config(num_blocks=2, lora_rank=2)
    plain = perturb(Evoformer(dataclasses.replace(cfg, lora_rank=0), rngs=nnx.Rngs(0)), 2)
    params = export_alphafold_evoformer(plain)
    model = load_alphafold_evoformer(params, cfg)
    weights = _flat(model)
    for path, value in _flat(plain).items():
        np.testing.assert_array_equal(weights[path], value)
    assert all(not np.any(v) for p, v in weights.items() if p[-1] == "lora_b")  # fresh adapters: no change
    with pytest.raises(ValueError, match="has LoRA adapters, which AlphaFold's parameters cannot hold"):
        export_alphafold_evoformer(model)
    assert export_alphafold_evoformer(without_lora(model)).keys() == params.keys()
    with pytest.raises(ValueError, match="lora_quant='nf4': the Evoformer's frozen weights"):
        small_config(lora_rank=2, lora_quant="nf4")
    bf16 = Evoformer(small_config(lora_rank=2, precision="bf16", lora_train="masked_msa_head"), rngs=nnx.Rngs(0))
    dtypes = {p: v.dtype for p, v in _flat(bf16).items()}  # frozen weights in the compute dtype, no master copy
    assert all(d == (np.float32 if is_lora(p) or "masked_msa_head" in p else jnp.bfloat16) for p, d in dtypes.items())


def test_adapters_on_a_dap_mesh_equal_one_device():
    cfg = small_config(num_blocks=1, lora_rank=2, lora_targets="all")
    graphdef, state = nnx.split(EvoformerStack(cfg, rngs=nnx.Rngs(0)))
    rng = np.random.default_rng(3)
    state = jax.tree.map(lambda x: np.asarray(x) + rng.normal(scale=0.3, size=x.shape).astype(x.dtype), state)
    m, z, msa_mask, pair_mask, _ = make_inputs(seed=4)
    fn = _loss_grad_fn(graphdef, (msa_mask, pair_mask), jax.random.key(7))
    loss0, grads0 = jax.device_get(fn(state, m, z))
    with jax.set_mesh(make_mesh(ParallelConfig.parse("dap=4"))):
        loss, grads = jax.device_get(fn(state, m, z))
    np.testing.assert_allclose(loss, loss0, rtol=1e-4)  # float32 sums of a loss of ~8e3 in another order
    flat, flat0 = nnx.to_flat_state(grads[0]), nnx.to_flat_state(grads0[0])
    scale = max(np.abs(g[...]).max() for _, g in flat0)
    lora_grads = 0
    for (path, g), (_, g0) in zip(flat, flat0, strict=True):
        np.testing.assert_allclose(g[...], g0[...], rtol=1e-4, atol=1e-5 * scale)
        lora_grads += is_lora(path) and np.abs(g0[...]).max() > 0
    assert lora_grads > 20


TINY = ["--c-m", "16", "--c-z", "8", "--msa-heads", "2", "--msa-head-dim", "4", "--pair-heads", "2",
        "--pair-head-dim", "4", "--opm-channels", "4", "--tri-mul-channels", "8", "--num-blocks", "1",
        "--num-seq", "4", "--seq-len", "12", "--batch-size", "2", "--eval-every", "3", "--save-every", "3",
        "--warmup-steps", "1", "--no-progress"]


def test_msa_evoformer_fine_tunes_adapters_from_a_pretrained_run(tmp_path, capsys):
    from sciscale_jax.recipes import load_run

    base, tuned = tmp_path / "base", tmp_path / "tuned"
    assert cli.main(["train", "msa-evoformer", "--out", str(base), "--steps", "2", *TINY]) == 0
    assert cli.main(["train", "msa-evoformer", "--out", str(tuned), "--steps", "3", "--init-from", str(base),
                     "--lora-rank", "2", "--lora-targets", "all", "--lr", "3e-2", *TINY]) == 0
    capsys.readouterr()
    before, after = load_run(base).model, load_run(tuned).model
    w0, w1 = _flat(before), _flat(after)
    assert {p for p in w1 if not is_lora(p)} == set(w0)
    for path, value in w0.items():  # the pretrained weights, bit for bit
        np.testing.assert_array_equal(w1[path], value, err_msg="/".join(path))
    assert any(np.abs(v).max() > 0 for p, v in w1.items() if p[-1] == "lora_b")  # the adapters trained
    record = json.loads((tuned / "run_config.json").read_text())
    assert "frozen_weights" in record  # its checkpoints hold the adapters alone
    assert cli.main(["eval", str(tuned)]) == 0
    out = capsys.readouterr().out
    assert "checkpoint step 3" in out and "gain_over_profile" in out
