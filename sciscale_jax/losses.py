"""Token losses shared by the language-model recipes, as ``(model, batch, key) -> (sum, count)``.

Losses return the sum of per-token losses and the token count (not a mean), so gradient
accumulation weights microbatches by their real token counts and evaluation sums exactly.
They live here, beside the recipes that own them; the train step never names a loss.
"""

from __future__ import annotations

import jax.numpy as jnp
import optax


def token_cross_entropy(logits_bsv, targets_bs, weights_bs):
    """(sum of weighted token cross-entropies, sum of weights), in float32."""
    nll_bs = optax.softmax_cross_entropy_with_integer_labels(logits_bsv.astype(jnp.float32), targets_bs)
    weights_bs = weights_bs.astype(jnp.float32)
    return jnp.sum(nll_bs * weights_bs), jnp.sum(weights_bs)


def mlm_loss(model, batch, key):
    """Masked-LM loss over the positions ``batch['weights']`` marks (packed rows where the batch
    carries ``segments``)."""
    logits = model(batch["inputs"], mask_bs=batch["mask"], segments_bs=batch.get("segments"), dropout_key=key)
    return token_cross_entropy(logits, batch["targets"], batch["weights"])


def causal_weights(batch):
    """Next-token weights [B, S-1]: 1 where tokens t and t+1 are both real (and, in packed rows with
    ``segments``, of one sequence: no token is predicted across a boundary)."""
    real = batch["mask"]
    pairs = real[:, 1:] & real[:, :-1]
    segments = batch.get("segments")
    if segments is not None:
        pairs = pairs & (segments[:, 1:] == segments[:, :-1])
    return pairs.astype(jnp.float32)


def causal_lm_loss(model, batch, key):
    """Next-token loss: position t predicts token t+1 wherever both are real (``causal_weights``)."""
    tokens = batch["inputs"]
    logits = model(tokens, mask_bs=batch["mask"], segments_bs=batch.get("segments"), dropout_key=key)
    return token_cross_entropy(logits[:, :-1], tokens[:, 1:], causal_weights(batch))
