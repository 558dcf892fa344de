"""protein-mlm: an ESM-style masked language model on real bacterial proteins.

Data: the 2,100 proteins of one genome shipped in pyhmmer (``sciscale_jax.data.protein``),
split by sequence hash into train and validation. The baseline is the perplexity of the
training split's amino-acid frequencies on the validation targets: a model below it has
learned context, not only composition. Defaults finish on 2 CPU cores in a few minutes.
"""

from __future__ import annotations

import math

from sciscale_jax.data import MLMBatches, ProteinTokenizer, load_proteins, split_by_sequence, unigram_perplexity
from sciscale_jax.losses import mlm_loss
from sciscale_jax.models import Transformer, TransformerConfig
from sciscale_jax.recipes.base import Data, Recipe


def build_data(train_cfg, model_cfg=None) -> Data:
    tok = ProteinTokenizer(unknown="x")
    train_seqs, val_seqs = split_by_sequence(load_proteins(), val_fraction=0.1)
    train_ids = [tok.encode(s, add_special=True) for s in train_seqs]
    val_ids = [tok.encode(s, add_special=True) for s in val_seqs]
    kw = dict(batch_size=train_cfg.batch_size, seq_len=train_cfg.seq_len, seed=train_cfg.seed)
    train = MLMBatches(train_ids, tok, **kw)
    evals = MLMBatches(val_ids, tok, **kw).eval_batches()
    return Data(train=train, eval=evals, vocab_size=tok.vocab_size,
                baselines={"unigram_ppl": unigram_perplexity(train_ids, evals, tok)})


def summarize(means: dict) -> dict:
    return {"ppl": math.exp(means["loss"])} if "loss" in means else {}


def check(model_cfg, train_cfg, data) -> None:
    if train_cfg.seq_len > model_cfg.max_len:
        raise ValueError(f"seq_len={train_cfg.seq_len} exceeds the model's max_len={model_cfg.max_len}")
    if model_cfg.vocab_size < data.vocab_size:
        raise ValueError(f"model vocab_size={model_cfg.vocab_size} is smaller than the data's {data.vocab_size}")


RECIPE = Recipe(
    name="protein-mlm",
    description="ESM-style masked LM on the 2,100 bacterial proteins shipped in pyhmmer",
    # 29 tokens padded to 32 rows, so the embedding splits over tensor-parallel meshes.
    model_defaults=dict(vocab_size=32, num_layers=4, num_heads=4, embed_dim=128, mlp_dim=512, max_len=1024, causal=False),
    train_defaults=dict(steps=300, batch_size=16, seq_len=128, learning_rate=2e-3, warmup_steps=30,
                        eval_every=100, save_every=100),
    config_class=TransformerConfig,
    build_model=lambda config, rngs: Transformer(config, rngs=rngs),
    build_data=build_data,
    loss_fn=mlm_loss,
    summarize=summarize,
    batch_axes={"*": ("batch", "seq")},
    check=check,
)
