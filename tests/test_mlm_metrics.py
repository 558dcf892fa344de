"""The protein MLM's metrics score mask-replaced positions and report kept / randomised ones
apart; its baselines (unigram, context-free table) are on the same position sets."""

import math

import jax
import numpy as np
import pytest
from flax import nnx

from sciscale_jax.data import ProteinTokenizer, load_proteins
from sciscale_jax.data.mlm import KEPT, MASKED, RANDOM, MLMBatches
from sciscale_jax.models import Transformer, TransformerConfig
from sciscale_jax.recipes.protein_mlm import RECIPE, evaluate_metrics, mlm_eval_metrics, summarize
from sciscale_jax.train import TrainConfig, split_model

CFG = TransformerConfig(vocab_size=32, num_layers=1, num_heads=2, embed_dim=16, mlp_dim=24, max_len=64)


def _batches(n=3):
    tok = ProteinTokenizer(unknown="x")
    enc = [tok.encode(s, add_special=True) for s in load_proteins()[:40]]
    src = MLMBatches(enc, tok, batch_size=5, seq_len=37, seed=4)
    return [src.batch(i) for i in range(n)]


def _reference(model, batches):
    """float64 numpy cross-entropy and top-1 hits per position set, summed over batches."""
    sums = {}
    for b in batches:
        logits = np.asarray(model(b["inputs"], mask_bs=b["mask"], dropout_key=None), np.float64)
        logp = logits - logits.max(-1, keepdims=True)
        logp = logp - np.log(np.exp(logp).sum(-1, keepdims=True))
        nll = -np.take_along_axis(logp, b["targets"][..., None], -1)[..., 0]
        hit = logits.argmax(-1) == b["targets"]
        for name, sel in (("", b["corruption"] == MASKED), ("_kept", b["corruption"] == KEPT),
                          ("_random", b["corruption"] == RANDOM)):
            for key, v in ((f"loss{name}", nll), (f"accuracy{name}", hit)):
                s, n = sums.get(key, (0.0, 0.0))
                sums[key] = (s + float(v[sel].sum()), n + float(sel.sum()))
        s, n = sums.get("loss_selected", (0.0, 0.0))
        sums["loss_selected"] = (s + float(nll[b["weights"] > 0].sum()), n + float((b["weights"] > 0).sum()))
    return sums


def test_eval_metrics_score_each_position_set_against_float64():
    model = Transformer(CFG, rngs=nnx.Rngs(1))
    batches = _batches()
    want = _reference(model, batches)
    got = {}
    for b in batches:
        for k, (s, n) in jax.jit(lambda bb: mlm_eval_metrics(model, bb))(b).items():
            gs, gn = got.get(k, (0.0, 0.0))
            got[k] = (gs + float(s), gn + float(n))
    assert set(got) == set(want)
    for k in want:
        assert got[k][1] == want[k][1], k                       # the same positions counted
        np.testing.assert_allclose(got[k][0], want[k][0], rtol=1e-5, atol=1e-4, err_msg=k)
    # The sets differ: masked positions are not the selected ones (kept / random are apart).
    assert want["loss"][1] < want["loss_selected"][1]
    assert want["loss"][1] + want["loss_kept"][1] + want["loss_random"][1] == want["loss_selected"][1]
    graphdef, params, rest = split_model(model)
    means = evaluate_metrics(graphdef, params, rest, batches)
    np.testing.assert_allclose(means["loss"], want["loss"][0] / want["loss"][1], rtol=1e-5)
    np.testing.assert_allclose(means["ppl"], math.exp(want["loss"][0] / want["loss"][1]), rtol=1e-5)


def test_summarize_gives_perplexities():
    out = summarize({"loss": 2.0, "loss_kept": 0.5, "accuracy": 0.3})
    assert out == pytest.approx({"ppl": math.exp(2.0), "ppl_kept": math.exp(0.5)})


def test_recipe_baselines_on_the_metric_position_sets():
    data = RECIPE.build_data(TrainConfig(batch_size=4, seq_len=32))
    b = data.baselines
    masked = sum(int((e["corruption"] == MASKED).sum()) for e in data.eval)
    assert masked >= 20_000
    # On masked positions the table sees only the mask token: the unigram of masked targets.
    assert abs(b["context_free_loss"] - b["unigram_loss"]) < 0.02
    # On kept positions it copies the visible residue, far below the unigram.
    assert b["context_free_loss_kept"] < b["unigram_loss_kept"] - 1.5
    assert b["unigram_ppl"] == pytest.approx(math.exp(b["unigram_loss"]))
