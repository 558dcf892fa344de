"""The MFU benchmark's FLOP count (benchmarks/mfu_gpu.py) against the model's own weights and XLA's count."""

import os
import sys

import jax
import numpy as np
import optax
import pytest
from flax import nnx

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
import mfu_gpu  # noqa: E402

from sciscale_jax.models import Transformer, TransformerConfig  # noqa: E402
from sciscale_jax.train import init_train_state, make_train_step  # noqa: E402

LAYERS, EMBED, HEADS, MLP, VOCAB, SEQ, BATCH = 2, 128, 2, 384, 33, 64, 2


def _model(causal=False):
    cfg = TransformerConfig(vocab_size=VOCAB, num_layers=LAYERS, num_heads=HEADS, embed_dim=EMBED, mlp_dim=MLP,
                            max_len=SEQ, causal=causal, attention="xla")
    return Transformer(cfg, rngs=nnx.Rngs(0))


def test_matmul_params_match_the_models_weight_matrices():
    """Every parameter except the embedding table and the norm scales multiplies activations."""
    _, params = nnx.split(_model(), nnx.Param)
    total, excluded = 0, 0
    for path, leaf in jax.tree_util.tree_leaves_with_path(nnx.to_pure_dict(params)):
        size = int(np.prod(leaf.shape))
        total += size
        names = "/".join(str(getattr(k, "key", k)) for k in path)
        if "embed" in names.split("/")[0] or "norm" in names:
            excluded += size
    assert excluded == VOCAB * EMBED + (2 * LAYERS + 1) * EMBED
    assert mfu_gpu.matmul_params(LAYERS, EMBED, MLP, VOCAB) == total - excluded
    # Hand count: q, k, v, out are E x E; SwiGLU has two E x M and one M x E; the head E x V.
    assert mfu_gpu.matmul_params(LAYERS, EMBED, MLP, VOCAB) == LAYERS * (4 * 128 * 128 + 3 * 128 * 384) + 128 * 33


def test_causal_attention_term_is_half():
    n = mfu_gpu.matmul_params(LAYERS, EMBED, MLP, VOCAB)
    full = mfu_gpu.flops_per_token(n, LAYERS, SEQ, EMBED, causal=False)
    assert full == 6 * n + 6 * LAYERS * SEQ * EMBED
    assert full - mfu_gpu.flops_per_token(n, LAYERS, SEQ, EMBED, causal=True) == 3 * LAYERS * SEQ * EMBED


def test_model_flops_agree_with_xla_cost_analysis():
    """XLA counts every dot (2 M N K) plus elementwise work; the model formula counts the dots
    alone, so it must fall just under XLA's total for a matmul-dominated step."""
    model = _model()
    tx = optax.sgd(0.1)
    graphdef, state = init_train_state(model, tx)
    step = jax.jit(make_train_step(graphdef, tx, loss_fn=mfu_gpu.unmasked_mlm_loss))
    cost = step.lower(state, mfu_gpu.make_batch(BATCH, SEQ)).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    n = mfu_gpu.matmul_params(LAYERS, EMBED, MLP, VOCAB)
    model_flops = mfu_gpu.flops_per_token(n, LAYERS, SEQ, EMBED, causal=False) * BATCH * SEQ
    assert 1.0 <= cost["flops"] / model_flops <= 1.12, (cost["flops"], model_flops)


@pytest.mark.parametrize("size", ["350m", "1b"])
def test_named_sizes_have_the_advertised_parameter_counts(size):
    layers, embed, heads, mlp = mfu_gpu.SIZES[size]
    n = mfu_gpu.matmul_params(layers, embed, mlp, mfu_gpu.PROTEIN_VOCAB)
    target = {"350m": 350e6, "1b": 1e9}[size]
    assert 0.9 * target <= n <= 1.1 * target
    assert embed // heads == 128
