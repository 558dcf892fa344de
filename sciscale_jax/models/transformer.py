"""A pre-norm Transformer in Flax NNX: bidirectional encoder (protein MLM) or causal decoder.

Rotary positions (Su et al. 2021), RMSNorm, SwiGLU (Shazeer 2020) or GELU MLP, untied
output head. Every technique is picked by a string in ``TransformerConfig`` (the switches it
inherits from ``sciscale_jax.models.stack.Techniques``): the attention implementation (through
``sciscale_jax.attention``), the remat policy (``sciscale_jax.remat``), precision and QAT
hooks and, with ``scan_layers=True``, layers stacked and run by ``lax.scan`` so compile time
does not grow with depth; the layer stack is the shared one of ``models.stack``. Activations carry checkpoint names from
``sciscale_jax.remat``; parameters carry logical axes from ``sciscale_jax.parallel.axes``.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from sciscale_jax import _validate, attention, remat
from sciscale_jax.models.layers import Dense, RMSNorm, dropout, param, rotary
import sciscale_jax.parallel as parallel
from sciscale_jax.parallel import axes as ax
from sciscale_jax.models.stack import Techniques, layer_keys, run_layers, stack_layers
from sciscale_jax.quant.registry import kv_quantizer, make_matmul

MLP_KINDS = ("swiglu", "gelu")


@dataclasses.dataclass(frozen=True)
class TransformerConfig(Techniques):
    """The Transformer's shape; the technique switches (remat, scan_layers, attention,
    precision, quant, sharding, dtypes) are inherited keyword-only fields of ``Techniques``."""

    vocab_size: int
    num_layers: int = dataclasses.field(default=4, metadata={"flag": "layers"})
    num_heads: int = dataclasses.field(default=4, metadata={"flag": "heads"})
    embed_dim: int = 128
    mlp_dim: int = 512
    max_len: int = 512
    causal: bool = False           # False: bidirectional encoder (MLM); True: decoder LM
    dropout: float = 0.0
    mlp: str = dataclasses.field(default="swiglu", metadata={"choices": MLP_KINDS})
    linformer_k: int = 256         # Linformer: keys/values projected to this many rows (capped at max_len)
    performer_features: int = 256  # Performer: random features per head
    rope_base: float = 10000.0

    def __post_init__(self):
        _validate.transformer_config(self)  # integral sizes (no bools), finite rope_base > 0, float dtypes
        for name in ("vocab_size", "num_layers", "num_heads", "embed_dim", "mlp_dim", "max_len", "linformer_k",
                     "performer_features"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"{name}={value!r} must be a positive integer")
        if self.embed_dim % self.num_heads:
            raise ValueError(f"embed_dim={self.embed_dim} is not divisible by num_heads={self.num_heads}")
        if (self.embed_dim // self.num_heads) % 2:
            raise ValueError(f"head_dim={self.embed_dim // self.num_heads} must be even for rotary positions")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout={self.dropout} must lie in [0, 1)")
        if not (isinstance(self.rope_base, (int, float)) and math.isfinite(self.rope_base) and self.rope_base > 0):
            raise ValueError(f"rope_base={self.rope_base!r} must be a positive finite number")
        if not isinstance(self.causal, bool):
            raise ValueError(f"causal={self.causal!r} must be a bool")
        if self.mlp not in MLP_KINDS:
            raise ValueError(f"unknown mlp {self.mlp!r}; known: {', '.join(MLP_KINDS)}")
        if self.attention == "linformer" and self.causal:
            raise ValueError("attention='linformer' cannot be causal (causal=True): Linformer mixes "
                             "future positions into every projected key")
        super().__post_init__()

    @property
    def head_dim(self) -> int:
        return self.embed_dim // self.num_heads


class Attention(nnx.Module):
    def __init__(self, cfg: TransformerConfig, *, rngs: nnx.Rngs):
        e, h, d = cfg.embed_dim, cfg.num_heads, cfg.head_dim
        kw = dict(rngs=rngs, dtype=cfg.dtype, param_dtype=cfg.param_dtype)
        hook = lambda: make_matmul(cfg.quant, cfg.precision)  # one per layer: fp8 keeps state
        self.query = Dense((e,), (h, d), (ax.EMBED, ax.HEADS, ax.KV), matmul=hook(), **kw)
        self.key = Dense((e,), (h, d), (ax.EMBED, ax.HEADS, ax.KV), matmul=hook(), **kw)
        self.value = Dense((e,), (h, d), (ax.EMBED, ax.HEADS, ax.KV), matmul=hook(), **kw)
        self.out = Dense((h, d), (e,), (ax.HEADS, ax.KV, ax.EMBED), matmul=hook(), **kw)
        self.cfg = cfg
        approx = None  # approximate attention modules carry parameters or feature seeds
        if cfg.attention == "linformer":
            approx = attention.LinformerAttention(cfg.max_len, min(cfg.linformer_k, cfg.max_len),
                                                  rngs=rngs, param_dtype=cfg.param_dtype)
        elif cfg.attention == "performer":
            approx = attention.PerformerAttention(d, cfg.performer_features, rngs=rngs)
        self.approx = approx

    def __call__(self, x_bse, positions_bs, mask_b11k):
        cfg = self.cfg
        q_bshd = rotary(self.query(x_bse), positions_bs, cfg.rope_base)
        k_bshd = rotary(self.key(x_bse), positions_bs, cfg.rope_base)
        v_bshd = self.value(x_bse)
        kv_quant = kv_quantizer(cfg.quant)
        if kv_quant is not None:  # LLM-QAT: fake-quantised KV cache
            k_bshd, v_bshd = kv_quant(k_bshd, v_bshd)
        q_bshd, k_bshd, v_bshd = (checkpoint_name(t, remat.QKV) for t in (q_bshd, k_bshd, v_bshd))
        if self.approx is not None:
            ctx_bshd = self.approx(q_bshd, k_bshd, v_bshd, mask=mask_b11k, causal=cfg.causal)
        else:
            ctx_bshd = attention.dot_product_attention(q_bshd, k_bshd, v_bshd, mask=mask_b11k,
                                                       causal=cfg.causal, impl=cfg.attention)
        ctx_bshd = checkpoint_name(ctx_bshd, remat.ATTN_CONTEXT)
        return self.out(ctx_bshd)


class Mlp(nnx.Module):
    def __init__(self, cfg: TransformerConfig, *, rngs: nnx.Rngs):
        kw = dict(rngs=rngs, dtype=cfg.dtype, param_dtype=cfg.param_dtype)
        e, m = cfg.embed_dim, cfg.mlp_dim
        hook = lambda: make_matmul(cfg.quant, cfg.precision)
        self.wi = Dense((e,), (m,), (ax.EMBED, ax.MLP), matmul=hook(), **kw)
        self.wg = Dense((e,), (m,), (ax.EMBED, ax.MLP), matmul=hook(), **kw) if cfg.mlp == "swiglu" else None
        self.wo = Dense((m,), (e,), (ax.MLP, ax.EMBED), matmul=hook(), **kw)

    def __call__(self, x_bse):
        if self.wg is not None:
            h_bsm = jax.nn.silu(self.wg(x_bse)) * self.wi(x_bse)
        else:
            h_bsm = jax.nn.gelu(self.wi(x_bse))
        return self.wo(checkpoint_name(h_bsm, remat.MLP_HIDDEN))


class Block(nnx.Module):
    """x + Attn(Norm(x)), then x + Mlp(Norm(x)), each sublayer output dropped out."""

    def __init__(self, cfg: TransformerConfig, *, rngs: nnx.Rngs):
        kw = dict(rngs=rngs, dtype=cfg.dtype, param_dtype=cfg.param_dtype)
        self.attn_norm = RMSNorm(cfg.embed_dim, **kw)
        self.attn = Attention(cfg, rngs=rngs)
        self.mlp_norm = RMSNorm(cfg.embed_dim, **kw)
        self.mlp = Mlp(cfg, rngs=rngs)
        self.rate, self.sharding = cfg.dropout, cfg.sharding

    def _residual(self, x_bse):
        """Constrain the residual stream by the rule table: under "tp_sp" it is split along the
        sequence over the tensor axis (Megatron sequence parallelism); without a mesh, a no-op."""
        return parallel.with_logical_constraint(x_bse, (ax.BATCH, ax.SEQ, ax.EMBED), self.sharding)

    def __call__(self, x_bse, positions_bs, mask_b11k, key=None):
        k_attn, k_mlp = (None, None) if key is None else tuple(jax.random.split(key))
        x_bse = checkpoint_name(self._residual(x_bse), remat.LAYER_INPUT)
        h_bse = checkpoint_name(self.attn_norm(x_bse), remat.ATTN_NORM)
        a_bse = checkpoint_name(self.attn(h_bse, positions_bs, mask_b11k), remat.ATTN_OUT)
        x_bse = self._residual(x_bse + dropout(a_bse, self.rate, k_attn))
        h_bse = checkpoint_name(self.mlp_norm(x_bse), remat.MLP_NORM)
        m_bse = checkpoint_name(self.mlp(h_bse), remat.MLP_OUT)
        return self._residual(x_bse + dropout(m_bse, self.rate, k_mlp))


class Transformer(nnx.Module):
    """tokens [batch, seq] -> float32 logits [batch, seq, vocab]."""

    def __init__(self, config: TransformerConfig, *, rngs: nnx.Rngs):
        cfg = self.config = config
        self.embed = param(rngs, jax.nn.initializers.normal(1.0), (cfg.vocab_size, cfg.embed_dim),
                           (ax.VOCAB, ax.EMBED), cfg.param_dtype)
        self.layers = stack_layers(lambda r: Block(cfg, rngs=r), cfg.num_layers, cfg, rngs=rngs)
        kw = dict(rngs=rngs, dtype=cfg.dtype, param_dtype=cfg.param_dtype)
        self.final_norm = RMSNorm(cfg.embed_dim, **kw)
        self.lm_head = Dense((cfg.embed_dim,), (cfg.vocab_size,), (ax.EMBED, ax.VOCAB), **kw)

    def __call__(self, tokens_bs, *, mask_bs=None, dropout_key=None):
        """``mask_bs``: True for real tokens (padding keys are never attended)."""
        x_bse = self.hidden(tokens_bs, mask_bs=mask_bs, dropout_key=dropout_key)
        logits_bsv = self.lm_head(x_bse).astype(jnp.float32)
        return checkpoint_name(logits_bsv, remat.LOGITS)

    def hidden(self, tokens_bs, *, mask_bs=None, dropout_key=None):
        """The final layer's normalised hidden states [batch, seq, embed], the input of the LM head:
        per-token (per-residue) embeddings, as protein language models are used downstream."""
        cfg = self.config
        if tokens_bs.ndim != 2:
            raise ValueError(f"tokens must be [batch, seq]; got shape {tokens_bs.shape}")
        batch, seq = tokens_bs.shape
        if seq > cfg.max_len:
            raise ValueError(f"sequence length {seq} exceeds max_len={cfg.max_len}")
        positions_bs = jnp.broadcast_to(jnp.arange(seq), (batch, seq))
        mask_b11k = None if mask_bs is None else mask_bs[:, None, None, :].astype(bool)
        x_bse = jnp.take(self.embed[...], tokens_bs, axis=0).astype(cfg.dtype)
        keys = layer_keys(dropout_key, cfg.num_layers, cfg.dropout > 0.0)
        x_bse = run_layers(self.layers, x_bse, positions_bs, mask_b11k, policy=cfg.remat, keys=keys)
        return self.final_norm(x_bse)


def hidden_states(model: Transformer, sequences, *, batch_size: int = 16, bucket: int = 64,
                  pad_id: int = 0) -> list[np.ndarray]:
    """``model.hidden`` of each int sequence in ``sequences``: a list of float32 [len, embed].

    Sequences are sorted by length and run ``batch_size`` at a time, padded with ``pad_id`` to a
    multiple of ``bucket`` (at most ``max_len``) under a key mask, so padding changes no state
    of a real token and a file of many lengths compiles only a few programs.
    """
    cfg = model.config
    lengths = [len(s) for s in sequences]
    if min(lengths, default=1) < 1 or max(lengths, default=0) > cfg.max_len:
        i = next(i for i, n in enumerate(lengths) if n < 1 or n > cfg.max_len)
        raise ValueError(f"sequence {i} has {lengths[i]} tokens; the model takes 1 to max_len={cfg.max_len}")
    graphdef, state = nnx.split(model)
    run = jax.jit(lambda state, tokens, mask: nnx.merge(graphdef, state).hidden(tokens, mask_bs=mask))
    out = [None] * len(sequences)
    order = sorted(range(len(sequences)), key=lengths.__getitem__)
    for start in range(0, len(order), batch_size):
        rows = order[start:start + batch_size]
        width = min(cfg.max_len, -(-max(lengths[i] for i in rows) // bucket) * bucket)
        tokens = np.full((len(rows), width), pad_id, np.int32)
        for r, i in enumerate(rows):
            tokens[r, :lengths[i]] = sequences[i]
        real = np.arange(width)[None, :] < np.asarray([lengths[i] for i in rows])[:, None]
        states = np.asarray(run(state, tokens, real), np.float32)
        for r, i in enumerate(rows):
            out[i] = states[r, :lengths[i]]
    return out
