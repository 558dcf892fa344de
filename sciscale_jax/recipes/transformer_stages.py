"""The Transformer's layer stack as pipeline stages (``parallel.PipelineStages``) under the
language-model losses of ``sciscale_jax.losses``: what protein-mlm and smiles-lm give as
``Recipe.pipeline``. Each function repeats the matching part of ``Transformer.__call__`` and
of the loss, so the pipelined loss is the unpipelined one."""

from __future__ import annotations

import jax.numpy as jnp

from sciscale_jax.losses import causal_weights, token_cross_entropy
from sciscale_jax.models.transformer import block_inputs
from sciscale_jax.parallel import PipelineStages


def embed(model, batch):
    """Token embedding [B, S, E] in the compute dtype (after ESM-2's token dropout if set)."""
    return model.embed_tokens(batch["inputs"], batch["mask"], batch.get("segments"))


def block_args(batch):
    """(positions [B, S], key mask [B, 1, 1, S], segments [B, S] or None) for
    ``Block(x, positions, mask, segments, key)``."""
    batch_size, seq = batch["inputs"].shape
    segments = batch.get("segments")
    return (*block_inputs(batch_size, seq, batch["mask"], segments), segments)


def _logits(model, h):
    return model.logits(model.final_norm(h))


def mlm_head(model, h, batch):
    return token_cross_entropy(_logits(model, h), batch["targets"], batch["weights"])[0]


def mlm_count(batch):
    return jnp.sum(batch["weights"].astype(jnp.float32))


def causal_head(model, h, batch):
    return token_cross_entropy(_logits(model, h)[:, :-1], batch["inputs"][:, 1:], causal_weights(batch))[0]


def causal_count(batch):
    return jnp.sum(causal_weights(batch))


MLM = PipelineStages(embed_fn=embed, block_args_fn=block_args, head_fn=mlm_head, count_fn=mlm_count)
CAUSAL_LM = PipelineStages(embed_fn=embed, block_args_fn=block_args, head_fn=causal_head, count_fn=causal_count)
