"""Incremental decoding of a causal ``Transformer`` with a key/value cache.

Autoregressive sampling that reruns the full causal forward pass for every new token costs
O(L^2) token-layer evaluations for a sequence of L tokens; caching each layer's rotary-rotated
keys and its values (as GPT-2 and every LLM server do) makes each new token one row through
the stack plus one attention row over the cache, O(L) in all. ``decode_step`` computes, for
one new token per sequence at position ``t``, exactly the logits the full forward pass gives
at ``t`` (same modules and parameters; attention written as a softmax over the cached rows
0..t). Exact attention implementations only: Linformer and Performer mix keys in ways a cache
of rows does not reproduce, and are refused.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from sciscale_jax.models.layers import rotary
from sciscale_jax.models.transformer import Transformer
from sciscale_jax.quant.registry import kv_quantizer

APPROXIMATE = ("linformer", "performer")


def _blocks(model: Transformer) -> list:
    """The model's blocks as separate modules (a scanned stack is sliced along its ``layers`` axis)."""
    if isinstance(model.layers, nnx.List):
        return list(model.layers)
    graphdef, state = nnx.split(model.layers)
    return [nnx.merge(graphdef, jax.tree.map(lambda a, i=i: a[i], state)) for i in range(model.config.num_layers)]


def check_decodable(model) -> None:
    """ValueError unless ``model`` is a causal Transformer with exact attention."""
    cfg = getattr(model, "config", None)
    if not isinstance(model, Transformer) or not cfg.causal:
        raise ValueError("KV-cache decoding needs a causal Transformer (causal=True)")
    if cfg.attention in APPROXIMATE:
        raise ValueError(f"attention={cfg.attention!r} is approximate; KV-cache decoding needs exact attention")


def init_cache(model: Transformer, batch: int, length: int) -> list:
    """One (keys, values) pair of zeros [batch, length, heads, head_dim] per layer."""
    check_decodable(model)
    cfg = model.config
    if length > cfg.max_len:
        raise ValueError(f"cache length={length} exceeds the model's max_len={cfg.max_len}")
    shape = (batch, length, cfg.num_heads, cfg.head_dim)
    return [(jnp.zeros(shape, cfg.dtype), jnp.zeros(shape, cfg.dtype)) for _ in range(cfg.num_layers)]


def decode_step(model: Transformer, cache: list, tokens_b, t):
    """Logits [batch, vocab] at position ``t`` after feeding ``tokens_b`` there; returns (logits, cache).

    ``cache`` must hold the keys and values of positions 0..t-1 (from earlier steps);
    ``t`` may be traced (this runs under ``jit`` and ``lax.scan``).
    """
    cfg = model.config
    quant_kv = kv_quantizer(cfg.quant)
    x_b1e = model.embed_tokens(tokens_b[:, None])
    positions_b1 = jnp.full(x_b1e.shape[:2], t)
    new_cache = []
    for block, (k_cache, v_cache) in zip(_blocks(model), cache):
        attn = block.attn
        h_b1e = block.attn_norm(x_b1e)
        q_b1hd = rotary(attn.query(h_b1e), positions_b1, cfg.rope_base)
        k_b1hd = rotary(attn.key(h_b1e), positions_b1, cfg.rope_base)
        v_b1hd = attn.value(h_b1e)
        if quant_kv is not None:
            k_b1hd, v_b1hd = quant_kv(k_b1hd, v_b1hd)
        k_cache = jax.lax.dynamic_update_slice_in_dim(k_cache, k_b1hd.astype(k_cache.dtype), t, axis=1)
        v_cache = jax.lax.dynamic_update_slice_in_dim(v_cache, v_b1hd.astype(v_cache.dtype), t, axis=1)
        logits_bhk = jnp.einsum("bhd,bkhd->bhk", q_b1hd[:, 0].astype(jnp.float32), k_cache.astype(jnp.float32))
        logits_bhk = logits_bhk / jnp.sqrt(jnp.float32(cfg.head_dim))
        logits_bhk = jnp.where(jnp.arange(k_cache.shape[1]) <= t, logits_bhk, -jnp.inf)
        ctx_bhd = jnp.einsum("bhk,bkhd->bhd", jax.nn.softmax(logits_bhk, axis=-1), v_cache.astype(jnp.float32))
        x_b1e = x_b1e + attn.out(ctx_bhd[:, None].astype(cfg.dtype))
        x_b1e = x_b1e + block.mlp(block.mlp_norm(x_b1e))
        new_cache.append((k_cache, v_cache))
    logits_bv = model.logits(model.final_norm(x_b1e))[:, 0]
    return logits_bv, new_cache
