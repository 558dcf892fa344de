"""Plain XLA scaled dot-product attention: the reference every other implementation matches.

Materialises the [batch, heads, q_len, kv_len] logits, so memory grows quadratically with
sequence length. Softmax runs in float32; rows with no key to attend give zeros, not NaN.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from sciscale_jax import remat


def xla_attention(q_bqhd, k_bkhd, v_bkhd, *, bias=None, mask=None, causal=False, scale=None):
    """Reference attention. Shapes: q [B,Q,H,D], k/v [B,K,Hkv,D]; bias/mask broadcast to [B,H,Q,K]."""
    *_, q_len, num_heads, head_dim = q_bqhd.shape
    kv_len, kv_heads = k_bkhd.shape[1], k_bkhd.shape[2]
    scale = head_dim ** -0.5 if scale is None else scale
    if kv_heads != num_heads:  # grouped-query attention: repeat each kv head for its group
        k_bkhd = jnp.repeat(k_bkhd, num_heads // kv_heads, axis=2)
        v_bkhd = jnp.repeat(v_bkhd, num_heads // kv_heads, axis=2)
    logits_bhqk = jnp.einsum("bqhd,bkhd->bhqk", q_bqhd, k_bkhd,
                             preferred_element_type=jnp.float32) * scale
    if bias is not None:
        logits_bhqk = logits_bhqk + bias.astype(jnp.float32)
    logits_bhqk = checkpoint_name(logits_bhqk, remat.ATTN_LOGITS)
    valid = _combined_mask(mask, causal, q_len, kv_len)
    if valid is not None:
        logits_bhqk = jnp.where(valid, logits_bhqk, jnp.finfo(jnp.float32).min)
    probs_bhqk = jax.nn.softmax(logits_bhqk, axis=-1)
    if valid is not None:  # a row with every key masked attends to nothing: zeros, not uniform
        probs_bhqk = jnp.where(jnp.any(valid, axis=-1, keepdims=True), probs_bhqk, 0.0)
    probs_bhqk = checkpoint_name(probs_bhqk.astype(v_bkhd.dtype), remat.ATTN_PROBS)
    out_bqhd = jnp.einsum("bhqk,bkhd->bqhd", probs_bhqk, v_bkhd)
    return out_bqhd.astype(q_bqhd.dtype)


def _combined_mask(mask, causal, q_len, kv_len):
    """Boolean [.., Q, K] mask (True = attend) from a user mask and the causal flag, or None."""
    valid = None if mask is None else mask.astype(bool)
    if causal:
        # Query i sees keys j <= i + (kv_len - q_len): aligned at the end, as in decoding.
        causal_qk = jnp.tril(jnp.ones((q_len, kv_len), bool), k=kv_len - q_len)
        valid = causal_qk if valid is None else valid & causal_qk
    return valid
