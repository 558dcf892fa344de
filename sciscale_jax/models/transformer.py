"""A pre-norm Transformer in Flax NNX: bidirectional encoder (protein MLM) or causal decoder.

Rotary positions (Su et al. 2021), RMSNorm, SwiGLU (Shazeer 2020) or GELU MLP, untied
output head; or, with ``norm="layer"``, ``bias=True``, ``mlp="gelu_exact"``, ``head="esm"`` and
``token_dropout_id`` set to the mask token, ESM-2's layers (Lin et al. 2023): LayerNorm, biased
projections, erf GELU, an LM head of dense + GELU + LayerNorm + the embedding transposed + a
bias, and token dropout (mask tokens' embeddings zeroed, the rest scaled by
``(1 - 0.15 * 0.8) / (1 - share of mask tokens)``), so ESM-2 checkpoints run here
(``sciscale_jax.models.esm``).

Packed rows: ``segments_bs`` (int [batch, seq], one id per contiguous run of tokens, padding its
own run) makes each sequence of a row attend only to itself, start its rotary positions at 0 and
take ESM-2's token-dropout share over its own tokens, so a packed row computes what each of its
sequences would alone.

Every technique is picked by a string in ``TransformerConfig`` (the switches it inherits
from ``sciscale_jax.models.stack.Techniques``): the attention implementation (through
``sciscale_jax.attention``), the remat policy (``sciscale_jax.remat``), precision and QAT
hooks and, with ``scan_layers=True``, layers stacked and run by ``lax.scan`` so compile time
does not grow with depth; the layer stack is the shared one of ``models.stack``. Activations
carry checkpoint names from ``sciscale_jax.remat``; parameters carry logical axes from
``sciscale_jax.parallel.axes``.
"""

from __future__ import annotations

import dataclasses
import math
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from sciscale_jax import _validate, attention, remat
from sciscale_jax.models.layers import Dense, LayerNorm, RMSNorm, dropout, param, rotary
import sciscale_jax.parallel as parallel
from sciscale_jax.parallel import axes as ax
from sciscale_jax.models.stack import Techniques, layer_keys, lora_trains, run_layers, stack_layers, store_frozen
from sciscale_jax.quant.registry import kv_quantizer, make_matmul

MLP_KINDS = ("swiglu", "gelu", "gelu_exact")  # gelu: tanh approximation; gelu_exact: erf (ESM, BERT)
NORM_KINDS = ("rms", "layer")
HEAD_KINDS = ("linear", "esm")
ESM_MASK_RATIO = 0.15 * 0.8  # ESM-2's token dropout: the share of mask tokens it was trained with


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
    norm: str = dataclasses.field(default="rms", metadata={
        "choices": NORM_KINDS, "help": "rms: RMSNorm (eps 1e-6); layer: LayerNorm with bias (eps 1e-5, ESM-2)"})
    bias: bool = dataclasses.field(default=False, metadata={
        "help": "biases on the attention and MLP projections (ESM-2)"})
    head: str = dataclasses.field(default="linear", metadata={
        "choices": HEAD_KINDS, "help": "linear: an untied output projection; esm: ESM-2's LM head (dense, GELU, "
        "LayerNorm, the token embedding transposed, a bias)"})
    token_dropout_id: int = dataclasses.field(default=-1, metadata={
        "help": "ESM-2's token dropout of this token (the mask token): its embedding zeroed, the others scaled "
        "by 0.88 / (1 - its share of the sequence); -1: off"})
    linformer_k: int = 256         # Linformer: keys/values projected to this many rows (capped at max_len)
    performer_features: int = 256  # Performer: random features per head
    rope_base: float = 10000.0
    supports_lora: ClassVar[bool] = True  # adapters on the blocks' attention (and MLP) projections

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
        for name, known in (("mlp", MLP_KINDS), ("norm", NORM_KINDS), ("head", HEAD_KINDS)):
            if getattr(self, name) not in known:
                raise ValueError(f"unknown {name} {getattr(self, name)!r}; known: {', '.join(known)}")
        if not isinstance(self.bias, bool):
            raise ValueError(f"bias={self.bias!r} must be a bool")
        if (not isinstance(self.token_dropout_id, int) or isinstance(self.token_dropout_id, bool)
                or not -1 <= self.token_dropout_id < self.vocab_size):
            raise ValueError(f"token_dropout_id={self.token_dropout_id!r} must be a token id below "
                             f"vocab_size={self.vocab_size}, or -1 (off)")
        if self.token_dropout_id >= 0 and self.causal:
            raise ValueError("token_dropout_id is ESM-2's masked-LM token dropout; a causal model has no mask token")
        if self.attention == "linformer" and self.causal:
            raise ValueError("attention='linformer' cannot be causal (causal=True): Linformer mixes "
                             "future positions into every projected key")
        super().__post_init__()

    @property
    def head_dim(self) -> int:
        return self.embed_dim // self.num_heads


def _lora(cfg: TransformerConfig, target: str) -> dict:
    """The LoRA arguments of a ``Dense`` of the block part ``target`` ("attention" or "mlp"): an
    adapter where ``lora_targets`` says, the frozen kernel's storage (``lora_quant``) on all."""
    if not cfg.lora_rank:
        return {}
    kw = {"base_quant": cfg.lora_quant}
    if target == "attention" or cfg.lora_targets == "all":
        kw.update(lora_rank=cfg.lora_rank, lora_scale=cfg.lora_scale)
    return kw


class Attention(nnx.Module):
    def __init__(self, cfg: TransformerConfig, *, rngs: nnx.Rngs):
        e, h, d = cfg.embed_dim, cfg.num_heads, cfg.head_dim
        kw = dict(rngs=rngs, dtype=cfg.dtype, param_dtype=cfg.param_dtype, use_bias=cfg.bias, **_lora(cfg, "attention"))
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

    def _query_key(self, x_bse, positions_bs):
        """q and k [batch, seq, heads, head_dim], rotary positions applied."""
        return (rotary(self.query(x_bse), positions_bs, self.cfg.rope_base),
                rotary(self.key(x_bse), positions_bs, self.cfg.rope_base))

    def __call__(self, x_bse, positions_bs, mask_b11k, segments_bs=None):
        cfg = self.cfg
        q_bshd, k_bshd = self._query_key(x_bse, positions_bs)
        v_bshd = self.value(x_bse)
        kv_quant = kv_quantizer(cfg.quant)
        if kv_quant is not None:  # LLM-QAT: fake-quantised KV cache
            k_bshd, v_bshd = kv_quant(k_bshd, v_bshd)
        q_bshd, k_bshd, v_bshd = (checkpoint_name(t, remat.QKV) for t in (q_bshd, k_bshd, v_bshd))
        if self.approx is not None:
            if segments_bs is not None:
                raise ValueError(f"attention={cfg.attention!r} mixes every position of a row, so packed rows "
                                 f"(segments) cannot keep their sequences apart; use exact attention")
            ctx_bshd = self.approx(q_bshd, k_bshd, v_bshd, mask=mask_b11k, causal=cfg.causal)
        else:
            runs_bs = None if segments_bs is None else segment_runs(segments_bs)
            ctx_bshd = attention.dot_product_attention(q_bshd, k_bshd, v_bshd, mask=mask_b11k,
                                                       segment_ids=runs_bs, causal=cfg.causal,
                                                       impl=cfg.attention)
        ctx_bshd = checkpoint_name(ctx_bshd, remat.ATTN_CONTEXT)
        return self.out(ctx_bshd)

    def probabilities(self, x_bse, positions_bs, mask_b11k):
        """The exact attention probabilities softmax(q k^T / sqrt(head_dim)) [batch, heads, query, key]
        in float32 (padding keys and, if causal, future keys get none), whatever ``attention``
        computes the layer with: attention maps, for analysis and ESM-2's contact head."""
        cfg = self.cfg
        q_bshd, k_bshd = (t.astype(jnp.float32) for t in self._query_key(x_bse, positions_bs))
        scores_bhqk = jnp.einsum("bqhd,bkhd->bhqk", q_bshd, k_bshd, precision=jax.lax.Precision.HIGHEST)
        scores_bhqk = scores_bhqk * cfg.head_dim ** -0.5
        s = x_bse.shape[1]
        keep = jnp.ones((1, 1, s, s), bool) if mask_b11k is None else mask_b11k.astype(bool)  # [b, 1, 1, k]
        if cfg.causal:
            keep = keep & jnp.tril(jnp.ones((s, s), bool))
        return jax.nn.softmax(jnp.where(keep, scores_bhqk, -jnp.inf), axis=-1)


class Mlp(nnx.Module):
    def __init__(self, cfg: TransformerConfig, *, rngs: nnx.Rngs):
        kw = dict(rngs=rngs, dtype=cfg.dtype, param_dtype=cfg.param_dtype, use_bias=cfg.bias, **_lora(cfg, "mlp"))
        e, m = cfg.embed_dim, cfg.mlp_dim
        hook = lambda: make_matmul(cfg.quant, cfg.precision)
        self.wi = Dense((e,), (m,), (ax.EMBED, ax.MLP), matmul=hook(), **kw)
        self.wg = Dense((e,), (m,), (ax.EMBED, ax.MLP), matmul=hook(), **kw) if cfg.mlp == "swiglu" else None
        self.wo = Dense((m,), (e,), (ax.MLP, ax.EMBED), matmul=hook(), **kw)
        self.exact = cfg.mlp == "gelu_exact"

    def __call__(self, x_bse):
        if self.wg is not None:
            h_bsm = jax.nn.silu(self.wg(x_bse)) * self.wi(x_bse)
        else:
            h_bsm = jax.nn.gelu(self.wi(x_bse), approximate=not self.exact)
        return self.wo(checkpoint_name(h_bsm, remat.MLP_HIDDEN))


def norm(cfg: TransformerConfig, rngs: nnx.Rngs):
    """The config's normalisation layer over ``embed_dim``."""
    kind = LayerNorm if cfg.norm == "layer" else RMSNorm
    return kind(cfg.embed_dim, rngs=rngs, dtype=cfg.dtype, param_dtype=cfg.param_dtype)


class EsmHead(nnx.Module):
    """ESM-2's LM head: LayerNorm(GELU(dense(x))) . embedding^T + bias (the embedding passed in: tied)."""

    def __init__(self, cfg: TransformerConfig, *, rngs: nnx.Rngs):
        kw = dict(rngs=rngs, dtype=cfg.dtype, param_dtype=cfg.param_dtype)
        self.dense = Dense((cfg.embed_dim,), (cfg.embed_dim,), (ax.EMBED, ax.MLP), use_bias=True, **kw)
        self.norm = LayerNorm(cfg.embed_dim, **kw)
        self.bias = param(rngs, jax.nn.initializers.zeros, (cfg.vocab_size,), (ax.VOCAB,), cfg.param_dtype)
        self.dtype = cfg.dtype

    def __call__(self, h_bse, embed_ve):
        y_bse = self.norm(jax.nn.gelu(self.dense(h_bse), approximate=False))
        logits_bsv = jnp.einsum("bse,ve->bsv", y_bse.astype(self.dtype), embed_ve.astype(self.dtype))
        return logits_bsv + self.bias[...].astype(self.dtype)


class Block(nnx.Module):
    """x + Attn(Norm(x)), then x + Mlp(Norm(x)), each sublayer output dropped out."""

    def __init__(self, cfg: TransformerConfig, *, rngs: nnx.Rngs):
        self.attn_norm = norm(cfg, rngs)
        self.attn = Attention(cfg, rngs=rngs)
        self.mlp_norm = norm(cfg, rngs)
        self.mlp = Mlp(cfg, rngs=rngs)
        self.rate, self.sharding = cfg.dropout, cfg.sharding

    def _residual(self, x_bse):
        """Constrain the residual stream by the rule table: under "tp_sp" it is split along the
        sequence over the tensor axis (Megatron sequence parallelism); without a mesh, a no-op."""
        return parallel.with_logical_constraint(x_bse, (ax.BATCH, ax.SEQ, ax.EMBED), self.sharding)

    def __call__(self, x_bse, positions_bs, mask_b11k, segments_bs=None, key=None):
        k_attn, k_mlp = (None, None) if key is None else tuple(jax.random.split(key))
        x_bse = checkpoint_name(self._residual(x_bse), remat.LAYER_INPUT)
        h_bse = checkpoint_name(self.attn_norm(x_bse), remat.ATTN_NORM)
        a_bse = checkpoint_name(self.attn(h_bse, positions_bs, mask_b11k, segments_bs), remat.ATTN_OUT)
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
        self.final_norm = norm(cfg, rngs)
        if cfg.head == "esm":
            self.esm_head = EsmHead(cfg, rngs=rngs)
        else:
            self.lm_head = Dense((cfg.embed_dim,), (cfg.vocab_size,), (ax.EMBED, ax.VOCAB), **kw)
        if cfg.lora_rank:  # everything but the adapters is frozen: kept in the compute dtype
            store_frozen(self, cfg.dtype, lora_trains(cfg))

    def __call__(self, tokens_bs, *, mask_bs=None, segments_bs=None, dropout_key=None):
        """``mask_bs``: True for real tokens (padding keys are never attended); ``segments_bs``: the
        sequence each token belongs to in a packed row (see the module docstring)."""
        return self.logits(self.hidden(tokens_bs, mask_bs=mask_bs, segments_bs=segments_bs,
                                       dropout_key=dropout_key))

    def logits(self, h_bse):
        """The output head on normalised hidden states [batch, seq, embed] -> float32 logits [batch, seq, vocab]."""
        if self.config.head == "esm":
            logits_bsv = self.esm_head(h_bse, self.embed[...])
        else:
            logits_bsv = self.lm_head(h_bse)
        return checkpoint_name(logits_bsv.astype(jnp.float32), remat.LOGITS)

    def embed_tokens(self, tokens_bs, mask_bs=None, segments_bs=None):
        """Token embeddings [batch, seq, embed] in the compute dtype, after ESM-2's token dropout if set
        (``mask_bs``: True for real tokens, the length each sequence's mask-token share is taken over;
        with ``segments_bs``, each packed sequence's own share)."""
        cfg = self.config
        x_bse = jnp.take(self.embed[...], tokens_bs, axis=0)
        if cfg.token_dropout_id >= 0:
            masked_bs = tokens_bs == cfg.token_dropout_id
            real_bs = jnp.ones(tokens_bs.shape, bool) if mask_bs is None else mask_bs.astype(bool)
            if segments_bs is None:
                share_bs = (jnp.sum(masked_bs & real_bs, axis=-1) / jnp.maximum(jnp.sum(real_bs, axis=-1), 1))[:, None]
            else:
                share_bs = _per_run_share(masked_bs & real_bs, real_bs, segments_bs)
            left_bs = 1.0 - share_bs.astype(jnp.float32)  # 0 only when every token is masked (all zero then)
            scale_bs = (1.0 - ESM_MASK_RATIO) / jnp.where(left_bs > 0, left_bs, 1.0)
            x_bse = jnp.where(masked_bs[..., None], 0.0, x_bse.astype(jnp.float32) * scale_bs[..., None])
        return x_bse.astype(cfg.dtype)

    def hidden(self, tokens_bs, *, mask_bs=None, segments_bs=None, dropout_key=None):
        """The final layer's normalised hidden states [batch, seq, embed], the input of the LM head:
        per-token (per-residue) embeddings, as protein language models are used downstream."""
        cfg = self.config
        if tokens_bs.ndim != 2:
            raise ValueError(f"tokens must be [batch, seq]; got shape {tokens_bs.shape}")
        batch, seq = tokens_bs.shape
        if seq > cfg.max_len:
            raise ValueError(f"sequence length {seq} exceeds max_len={cfg.max_len}")
        if segments_bs is not None and tuple(segments_bs.shape) != (batch, seq):
            raise ValueError(f"segments of shape {tuple(segments_bs.shape)} must match tokens {(batch, seq)}")
        positions_bs, mask_b11k = block_inputs(batch, seq, mask_bs, segments_bs)
        x_bse = self.embed_tokens(tokens_bs, mask_bs, segments_bs)
        keys = layer_keys(dropout_key, cfg.num_layers, cfg.dropout > 0.0)
        x_bse = run_layers(self.layers, x_bse, positions_bs, mask_b11k, segments_bs, policy=cfg.remat, keys=keys)
        return self.final_norm(x_bse)


def segment_starts(segments_bs):
    """True where a token begins a new run of equal segment ids (and at every row's start)."""
    first = jnp.ones(segments_bs.shape[:1] + (1,), bool)
    return jnp.concatenate([first, segments_bs[:, 1:] != segments_bs[:, :-1]], axis=1)


def segment_runs(segments_bs):
    """Each token's run of equal segment ids numbered along its row (1, 2, ...) [batch, seq]: the ids
    attention compares. They rise along the row whatever the ids were (padding at the end included),
    so the tiles of two different runs span disjoint ranges and are skipped (``chunked``, ``flash``)."""
    return jnp.cumsum(segment_starts(segments_bs), axis=1, dtype=jnp.int32)


def segment_positions(segments_bs):
    """Each token's position within its run of equal segment ids [batch, seq] (0 at a run's start)."""
    index_s = jnp.arange(segments_bs.shape[1])
    start_bs = jax.lax.cummax(jnp.where(segment_starts(segments_bs), index_s, 0), axis=1)
    return index_s - start_bs


def _per_run_share(hit_bs, real_bs, segments_bs):
    """Per token, the share of ``hit`` among the real tokens of its run of equal segment ids."""
    batch, seq = segments_bs.shape
    run_bs = segment_runs(segments_bs) - 1 + (jnp.arange(batch) * seq)[:, None]
    hits = jax.ops.segment_sum(hit_bs.astype(jnp.float32).ravel(), run_bs.ravel(), num_segments=batch * seq)
    reals = jax.ops.segment_sum(real_bs.astype(jnp.float32).ravel(), run_bs.ravel(), num_segments=batch * seq)
    return (hits / jnp.maximum(reals, 1.0))[run_bs]


def block_inputs(batch: int, seq: int, mask_bs=None, segments_bs=None):
    """(rotary positions [batch, seq], key mask [batch, 1, 1, seq] or None) for the blocks: positions
    count from each packed sequence's start when ``segments_bs`` is given."""
    if segments_bs is None:
        positions_bs = jnp.broadcast_to(jnp.arange(seq), (batch, seq))
    else:
        positions_bs = segment_positions(segments_bs)
    return positions_bs, None if mask_bs is None else mask_bs[:, None, None, :].astype(bool)


def attention_maps(model: Transformer, tokens_bs, *, mask_bs=None, each=None):
    """Every layer's attention probabilities (``Attention.probabilities``) of ``tokens_bs``, in
    evaluation (no dropout): ``each(layer, probs_bhqk)`` is called per layer and the results are
    returned as a list (default: the maps themselves), so a caller can reduce each layer's maps
    before the next is formed."""
    cfg = model.config
    each = each or (lambda layer, probs: probs)
    batch, seq = tokens_bs.shape
    positions_bs = jnp.broadcast_to(jnp.arange(seq), (batch, seq))
    mask_b11k = None if mask_bs is None else mask_bs[:, None, None, :].astype(bool)
    x_bse = model.embed_tokens(tokens_bs, mask_bs)
    if isinstance(model.layers, nnx.List):
        blocks = list(model.layers)
    else:  # stacked: one block per slice of the leading layer axis
        graphdef, state = nnx.split(model.layers)
        blocks = [nnx.merge(graphdef, jax.tree.map(lambda a, i=i: a[i], state)) for i in range(cfg.num_layers)]
    out = []
    for layer, block in enumerate(blocks):
        out.append(each(layer, block.attn.probabilities(block.attn_norm(x_bse), positions_bs, mask_b11k)))
        x_bse = block(x_bse, positions_bs, mask_b11k)
    return out


def hidden_states(model: Transformer, sequences, *, batch_size: int = 16, bucket: int = 64,
                  pad_id: int = 0) -> list[np.ndarray]:
    """``model.hidden`` of each int sequence in ``sequences``: a list of float32 [len, embed].

    Sequences are sorted by length and run ``batch_size`` at a time, padded with ``pad_id`` to a
    multiple of ``bucket`` (at most ``max_len``) under a key mask, so padding changes no state
    of a real token and a file of many lengths compiles only a few programs.
    """
    return per_sequence(model, sequences, lambda m, tokens, mask: m.hidden(tokens, mask_bs=mask),
                        lambda out, n: out[:n], batch_size=batch_size, bucket=bucket, pad_id=pad_id)


def per_sequence(model: Transformer, sequences, fn, crop, *, batch_size: int = 16, bucket: int = 64,
                 pad_id: int = 0) -> list[np.ndarray]:
    """``fn(model, tokens_bs, mask_bs)`` (per-example outputs, jitted) of each int sequence in
    ``sequences``, each example's output cut to its length by ``crop(output, length)``: batched as
    ``hidden_states`` batches them."""
    cfg = model.config
    lengths = [len(s) for s in sequences]
    if min(lengths, default=1) < 1 or max(lengths, default=0) > cfg.max_len:
        i = next(i for i, n in enumerate(lengths) if n < 1 or n > cfg.max_len)
        raise ValueError(f"sequence {i} has {lengths[i]} tokens; the model takes 1 to max_len={cfg.max_len}")
    graphdef, state = nnx.split(model)
    run = jax.jit(lambda state, tokens, mask: fn(nnx.merge(graphdef, state), tokens, mask))
    out = [None] * len(sequences)
    order = sorted(range(len(sequences)), key=lengths.__getitem__)
    for start in range(0, len(order), batch_size):
        rows = order[start:start + batch_size]
        width = min(cfg.max_len, -(-max(lengths[i] for i in rows) // bucket) * bucket)
        tokens = np.full((len(rows), width), pad_id, np.int32)
        for r, i in enumerate(rows):
            tokens[r, :lengths[i]] = sequences[i]
        real = np.arange(width)[None, :] < np.asarray([lengths[i] for i in rows])[:, None]
        results = np.asarray(run(state, tokens, real), np.float32)
        for r, i in enumerate(rows):
            out[i] = crop(results[r], lengths[i])
    return out
