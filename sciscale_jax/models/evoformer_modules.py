"""Evoformer sub-modules of AlphaFold 2 (Jumper et al. 2021, supplementary Algorithms 7-15, 19).

Each class follows the module of the same name in DeepMind's ``alphafold/model/modules.py``:
the same layer norms (epsilon 1e-5, with scale and offset), projections, sigmoid gates
(weights zero, bias one at init), zero-initialised output projections ("final" init) and
parameter names (``query_w``, ``feat_2d_weights``, ``weights``/``bias``, ``scale``/``offset``),
so AlphaFold's parameter files map onto them name for name (``evoformer_params.py``). Each
module returns the residual *update*; the block adds it after dropout.

Shapes carry a leading batch axis: MSA m [B, S, R, c_m], pair z [B, R, R, c_z], MSA mask
[B, S, R] and pair mask [B, R, R] (True or 1 = real). Masked keys are never attended; a
query with no real key gets a zero update (AlphaFold's -1e9 logit bias gives a uniform one
instead; both leave every unpadded position alike). With ``cfg.chunk_size`` set, every
module runs in chunks along its non-reduced axis (AlphaFold's ``subbatch_size``, OpenFold's
``chunk_size``) through ``chunked``: a ``lax.map`` over padded chunks, each chunk
checkpointed when ``cfg.chunk_remat``, so training memory falls too.

Under ``cfg.lora_rank`` the attention weights ``query_w``, ``key_w``, ``value_w`` and
``output_w`` (with ``lora_targets="all"`` also every ``Linear``'s ``weights``) carry a LoRA
adapter named ``<weight>_lora`` (``layers.LoraAdapter``) whose output is added to the
weight's; AlphaFold's names stay as they are.
"""

from __future__ import annotations

from typing import Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx
from jax import lax
from jax.ad_checkpoint import checkpoint_name

from sciscale_jax import attention, remat
from sciscale_jax.models.layers import LoraAdapter, param
from sciscale_jax.parallel import axes as ax

LN_EPS = 1e-5   # AlphaFold's LAYER_NORM_EPSILON
OPM_EPS = 1e-3  # AlphaFold's outer-product-mean normaliser epsilon
init = jax.nn.initializers
# AlphaFold's Linear initialisers: 'linear' (LeCun) and 'relu' (He) truncated normals, 'final' zeros.
_INITS = {"linear": init.variance_scaling(1.0, "fan_in", "truncated_normal"),
          "relu": init.variance_scaling(2.0, "fan_in", "truncated_normal"),
          "final": init.zeros}


def chunked(fn: Callable, chunk_size: int | None, xs: Sequence, in_axes: Sequence[int], out_axis: int,
            checkpoint: bool = True):
    """``fn(*xs)`` evaluated in chunks of ``chunk_size`` along ``in_axes`` (one axis per input),
    results joined along ``out_axis``. The axis is zero-padded to whole chunks (padded mask
    entries are False) and cut back; gradients flow through ``lax.map``. ``fn`` must treat
    positions along the chunked axis independently."""
    n = xs[0].shape[in_axes[0]]
    if chunk_size is None or chunk_size >= n:
        return fn(*xs)
    num = -(-n // chunk_size)
    pad = num * chunk_size - n

    def split(x, a):
        x = jnp.moveaxis(x, a, 0)
        x = jnp.pad(x, [(0, pad)] + [(0, 0)] * (x.ndim - 1))
        return x.reshape((num, chunk_size) + x.shape[1:])

    def body(parts):
        out = fn(*[jnp.moveaxis(p, 0, a) for p, a in zip(parts, in_axes)])
        return jnp.moveaxis(out, out_axis, 0)

    if checkpoint:
        body = jax.checkpoint(body)
    out = lax.map(body, [split(x, a) for x, a in zip(xs, in_axes)])
    out = out.reshape((num * chunk_size,) + out.shape[2:])[:n]
    return jnp.moveaxis(out, 0, out_axis)


class LayerNorm(nnx.Module):
    """LayerNorm over the last axis with scale and offset (AlphaFold: eps 1e-5), in float32."""

    def __init__(self, dim: int, axis_name: str | None, *, rngs: nnx.Rngs, param_dtype="float32",
                 dtype="float32"):
        self.scale = param(rngs, init.ones, (dim,), (axis_name,), param_dtype)
        self.offset = param(rngs, init.zeros, (dim,), (axis_name,), param_dtype)
        self.dtype = dtype

    def __call__(self, x):
        x32 = x.astype(jnp.float32)
        mean = x32.mean(-1, keepdims=True)
        var = jnp.square(x32 - mean).mean(-1, keepdims=True)
        y = (x32 - mean) * lax.rsqrt(var + LN_EPS)
        return (y * self.scale[...].astype(jnp.float32) + self.offset[...].astype(jnp.float32)).astype(self.dtype)


class Linear(nnx.Module):
    """AlphaFold's Linear: y = x @ weights + bias, weights [c_in, c_out], init 'linear', 'relu' or 'final'."""

    def __init__(self, c_in: int, c_out: int, axes: tuple, *, rngs: nnx.Rngs, kind: str = "linear",
                 bias_init: float = 0.0, param_dtype="float32", dtype="float32", lora: tuple = ()):
        self.weights = param(rngs, _INITS[kind], (c_in, c_out), axes, param_dtype)
        self.bias = param(rngs, init.constant(bias_init), (c_out,), axes[1:], param_dtype)
        self.weights_lora = _adapter((c_in,), (c_out,), axes, lora, rngs, param_dtype, dtype)
        self.dtype = dtype

    def __call__(self, x):
        x = x.astype(self.dtype)
        y = x @ self.weights[...].astype(self.dtype) + self.bias[...].astype(self.dtype)
        return y if self.weights_lora is None else y + self.weights_lora(x)


def _adapter(in_shape, out_shape, axes, lora: tuple, rngs, param_dtype, dtype):
    """A ``LoraAdapter`` for a weight of shape in_shape + out_shape, or None; ``lora`` is
    (rank, scale) or () for none (``_lora``)."""
    if not lora:
        return None
    return LoraAdapter(in_shape, out_shape, axes, lora[0], lora[1], rngs=rngs, param_dtype=param_dtype, dtype=dtype)


def _lora(cfg, target: str) -> tuple:
    """(rank, scale) of the adapters a block's weight of ``target`` ("attention": the attention
    projections; "dense": the other Linear layers) carries under ``cfg``, or () for none."""
    if not getattr(cfg, "lora_rank", 0) or (target != "attention" and cfg.lora_targets != "all"):
        return ()
    return cfg.lora_rank, cfg.lora_scale


def _kw(cfg, rngs):
    return dict(rngs=rngs, param_dtype=cfg.param_dtype, dtype=cfg.dtype)


def row_attention(q_bnqhd, k_bnkhd, v_bnkhd, bias_bhqk, mask_bnk, impl: str):
    """Attention along the q/k axis of each of N independent rows through the library's front
    door. The N rows fold into the front door's batch; the bias [B, H, Q, K], shared by the rows,
    enters as [1, H, Q, K] per batch element (``vmap`` over B), so it is never copied per row and
    its gradient comes back summed over rows. The key mask [B, N, K] enters as [N, 1, 1, K]."""
    def one(q, k, v, bias_hqk, mask_nk):
        return attention.dot_product_attention(
            q, k, v, bias=None if bias_hqk is None else bias_hqk[None],
            mask=mask_nk.astype(bool)[:, None, None, :], impl=impl)
    return jax.vmap(one, in_axes=(0, 0, 0, None if bias_bhqk is None else 0, 0))(
        q_bnqhd, k_bnkhd, v_bnkhd, bias_bhqk, mask_bnk)


class Attention(nnx.Module):
    """AlphaFold's gated multi-head attention (Alg 7 lines 2-7): q, k, v without bias, q scaled by
    head_dim^-0.5, an optional shared bias, a sigmoid gate per head and channel, output w/b."""

    def __init__(self, c_in: int, heads: int, head_dim: int, cfg, *, rngs: nnx.Rngs, channel_axis=ax.EMBED):
        glorot = init.variance_scaling(1.0, "fan_avg", "uniform", in_axis=0, out_axis=(1, 2))
        pd, w_axes = cfg.param_dtype, (channel_axis, ax.HEADS, ax.KV)
        self.query_w = param(rngs, glorot, (c_in, heads, head_dim), w_axes, pd)
        self.key_w = param(rngs, glorot, (c_in, heads, head_dim), w_axes, pd)
        self.value_w = param(rngs, glorot, (c_in, heads, head_dim), w_axes, pd)
        self.gating_w = param(rngs, init.zeros, (c_in, heads, head_dim), w_axes, pd)
        self.gating_b = param(rngs, init.ones, (heads, head_dim), (ax.HEADS, ax.KV), pd)
        self.output_w = param(rngs, init.zeros, (heads, head_dim, c_in), (ax.HEADS, ax.KV, channel_axis), pd)
        self.output_b = param(rngs, init.zeros, (c_in,), (channel_axis,), pd)
        lora, dt = _lora(cfg, "attention"), cfg.dtype  # adapters on q, k, v and the output (not the gate)
        self.query_w_lora, self.key_w_lora, self.value_w_lora = (
            _adapter((c_in,), (heads, head_dim), w_axes, lora, rngs, pd, dt) for _ in range(3))
        self.output_w_lora = _adapter((heads, head_dim), (c_in,), (ax.HEADS, ax.KV, channel_axis), lora, rngs, pd, dt)
        self.dtype, self.impl = cfg.dtype, cfg.attention

    def __call__(self, x_bnqc, bias_bhqk, mask_bnk):
        """x [B, N, Q, c] (already normalised) -> [B, N, Q, c]; attention along Q within each row."""
        x = x_bnqc.astype(self.dtype)
        w = lambda p: p[...].astype(self.dtype)  # noqa: E731
        q, k, v = (checkpoint_name(_plus(jnp.einsum("bnqc,chd->bnqhd", x, w(p)), adapter, x), remat.QKV)
                   for p, adapter in ((self.query_w, self.query_w_lora), (self.key_w, self.key_w_lora),
                                      (self.value_w, self.value_w_lora)))
        bias = None if bias_bhqk is None else bias_bhqk.astype(self.dtype)
        ctx = row_attention(q, k, v, bias, mask_bnk, self.impl)
        gate = jax.nn.sigmoid(jnp.einsum("bnqc,chd->bnqhd", x, w(self.gating_w)) + w(self.gating_b))
        ctx = checkpoint_name(ctx * gate, remat.ATTN_CONTEXT)
        out = jnp.einsum("bnqhd,hdo->bnqo", ctx, w(self.output_w)) + w(self.output_b)
        return _plus(out, self.output_w_lora, ctx)


def _plus(y, adapter, x):
    """``y`` plus ``adapter(x)`` (``y`` as it is without an adapter)."""
    return y if adapter is None else y + adapter(x)


def _pair_bias(x_bqkc, weights, dtype):
    """feat_2d_weights projection of the normalised pair: [B, Q, K, c_z] -> bias [B, H, Q, K]."""
    bias = jnp.einsum("bqkc,ch->bhqk", x_bqkc.astype(dtype), weights[...].astype(dtype))
    return checkpoint_name(bias, remat.PAIR_BIAS)


class MsaRowAttentionWithPairBias(nnx.Module):
    """Alg 7: gated self-attention along each MSA row, biased by a projection of the pair."""

    def __init__(self, c_m: int, c_z: int, heads: int, head_dim: int, cfg, *, rngs: nnx.Rngs):
        self.query_norm = LayerNorm(c_m, ax.EMBED, **_kw(cfg, rngs))
        self.feat_2d_norm = LayerNorm(c_z, ax.PAIR, **_kw(cfg, rngs))
        self.feat_2d_weights = param(rngs, init.normal(c_z ** -0.5), (c_z, heads), (ax.PAIR, ax.HEADS),
                                     cfg.param_dtype)
        self.attention = Attention(c_m, heads, head_dim, cfg, rngs=rngs)
        self.cfg = cfg

    def __call__(self, m_bsrc, z_brrc, msa_mask_bsr):
        bias = _pair_bias(self.feat_2d_norm(z_brrc), self.feat_2d_weights, self.cfg.dtype)
        fn = lambda m, mask: self.attention(self.query_norm(m), bias, mask)  # noqa: E731
        return chunked(fn, self.cfg.chunk_size, (m_bsrc, msa_mask_bsr), (1, 1), 1, self.cfg.chunk_remat)


class MsaColumnAttention(nnx.Module):
    """Alg 8: gated self-attention along each MSA column (over sequences), chunked over columns."""

    def __init__(self, c_m: int, heads: int, head_dim: int, cfg, *, rngs: nnx.Rngs):
        self.query_norm = LayerNorm(c_m, ax.EMBED, **_kw(cfg, rngs))
        self.attention = Attention(c_m, heads, head_dim, cfg, rngs=rngs)
        self.cfg = cfg

    def __call__(self, m_bsrc, msa_mask_bsr):
        m_brsc, mask_brs = jnp.swapaxes(m_bsrc, 1, 2), jnp.swapaxes(msa_mask_bsr, 1, 2)
        fn = lambda m, mask: self.attention(self.query_norm(m), None, mask)  # noqa: E731
        out = chunked(fn, self.cfg.chunk_size, (m_brsc, mask_brs), (1, 1), 1, self.cfg.chunk_remat)
        return jnp.swapaxes(out, 1, 2)


class GlobalAttention(nnx.Module):
    """Alg 19 lines 2-7: one query per head from the masked mean over sequences; single-head k, v."""

    def __init__(self, c_in: int, heads: int, head_dim: int, cfg, *, rngs: nnx.Rngs):
        glorot = init.variance_scaling(1.0, "fan_avg", "uniform", in_axis=0, out_axis=(1, 2))
        glorot2 = init.variance_scaling(1.0, "fan_avg", "uniform")
        pd, h_axes = cfg.param_dtype, (ax.EMBED, ax.HEADS, ax.KV)
        self.query_w = param(rngs, glorot, (c_in, heads, head_dim), h_axes, pd)
        self.key_w = param(rngs, glorot2, (c_in, head_dim), (ax.EMBED, ax.KV), pd)
        self.value_w = param(rngs, glorot2, (c_in, head_dim), (ax.EMBED, ax.KV), pd)
        self.gating_w = param(rngs, init.zeros, (c_in, heads, head_dim), h_axes, pd)
        self.gating_b = param(rngs, init.ones, (heads, head_dim), (ax.HEADS, ax.KV), pd)
        self.output_w = param(rngs, init.zeros, (heads, head_dim, c_in), (ax.HEADS, ax.KV, ax.EMBED), pd)
        self.output_b = param(rngs, init.zeros, (c_in,), (ax.EMBED,), pd)
        lora, dt = _lora(cfg, "attention"), cfg.dtype
        self.query_w_lora = _adapter((c_in,), (heads, head_dim), h_axes, lora, rngs, pd, dt)
        self.key_w_lora, self.value_w_lora = (_adapter((c_in,), (head_dim,), (ax.EMBED, ax.KV), lora, rngs, pd, dt)
                                              for _ in range(2))
        self.output_w_lora = _adapter((heads, head_dim), (c_in,), (ax.HEADS, ax.KV, ax.EMBED), lora, rngs, pd, dt)
        self.dtype, self.head_dim = cfg.dtype, head_dim

    def __call__(self, x_bnsc, mask_bns):
        """x [B, N, S, c] (normalised), attention over S within each of the N columns."""
        x = x_bnsc.astype(self.dtype)
        w = lambda p: p[...].astype(self.dtype)  # noqa: E731
        mask = mask_bns.astype(bool)
        mask_f = mask.astype(jnp.float32)[..., None]
        q_avg = (mask_f * x).sum(2) / (mask_f.sum(2) + 1e-10)  # AlphaFold's mask_mean
        q_avg = q_avg.astype(self.dtype)
        q = _plus(jnp.einsum("bnc,chd->bnhd", q_avg, w(self.query_w)), self.query_w_lora, q_avg) * self.head_dim ** -0.5
        k = _plus(jnp.einsum("bnsc,cd->bnsd", x, w(self.key_w)), self.key_w_lora, x)
        v = _plus(jnp.einsum("bnsc,cd->bnsd", x, w(self.value_w)), self.value_w_lora, x)
        logits = jnp.einsum("bnhd,bnsd->bnhs", q, k, preferred_element_type=jnp.float32)
        valid = mask[:, :, None, :]
        probs = jax.nn.softmax(jnp.where(valid, logits, jnp.finfo(jnp.float32).min), axis=-1)
        probs = jnp.where(valid.any(-1, keepdims=True), probs, 0.0).astype(self.dtype)
        avg = jnp.einsum("bnhs,bnsd->bnhd", probs, v)
        gate = jax.nn.sigmoid(jnp.einsum("bnsc,chd->bnshd", x, w(self.gating_w)) + w(self.gating_b))
        ctx = avg[:, :, None] * gate
        return _plus(jnp.einsum("bnshd,hdo->bnso", ctx, w(self.output_w)) + w(self.output_b), self.output_w_lora, ctx)


class MsaColumnGlobalAttention(nnx.Module):
    """Alg 19: the extra-MSA stack's column attention, global per column, chunked over columns."""

    def __init__(self, c_m: int, heads: int, head_dim: int, cfg, *, rngs: nnx.Rngs):
        self.query_norm = LayerNorm(c_m, ax.EMBED, **_kw(cfg, rngs))
        self.attention = GlobalAttention(c_m, heads, head_dim, cfg, rngs=rngs)
        self.cfg = cfg

    def __call__(self, m_bsrc, msa_mask_bsr):
        m_brsc, mask_brs = jnp.swapaxes(m_bsrc, 1, 2), jnp.swapaxes(msa_mask_bsr, 1, 2)
        fn = lambda m, mask: self.attention(self.query_norm(m), mask)  # noqa: E731
        out = chunked(fn, self.cfg.chunk_size, (m_brsc, mask_brs), (1, 1), 1, self.cfg.chunk_remat)
        return jnp.swapaxes(out, 1, 2)


class Transition(nnx.Module):
    """Alg 9 / 15: LayerNorm, Linear to factor*c ('relu' init), ReLU, Linear back ('final' init).
    Pointwise in positions; chunked along ``chunk_axis`` (residues)."""

    def __init__(self, c: int, factor: int, channel_axis: str, chunk_axis: int, cfg, *, rngs: nnx.Rngs):
        kw = _kw(cfg, rngs)
        self.input_layer_norm = LayerNorm(c, channel_axis, **kw)
        self.transition1 = Linear(c, factor * c, (channel_axis, ax.MLP), kind="relu", lora=_lora(cfg, "dense"), **kw)
        self.transition2 = Linear(factor * c, c, (ax.MLP, channel_axis), kind="final", lora=_lora(cfg, "dense"), **kw)
        self.cfg, self.chunk_axis = cfg, chunk_axis

    def __call__(self, x, mask=None):
        del mask  # AlphaFold's transition ignores the mask: padded positions never reach real ones
        def fn(x):
            h = checkpoint_name(jax.nn.relu(self.transition1(self.input_layer_norm(x))), remat.MLP_HIDDEN)
            return self.transition2(h)
        return chunked(fn, self.cfg.chunk_size, (x,), (self.chunk_axis,), self.chunk_axis, self.cfg.chunk_remat)


class OuterProductMean(nnx.Module):
    """Alg 10: z_ij += (sum_s a_si (x) b_sj) W + b, divided by (1e-3 + number of sequences real at
    both i and j), as AlphaFold does (the bias is divided too). Chunked over residues i."""

    def __init__(self, c_m: int, c_opm: int, c_z: int, cfg, *, rngs: nnx.Rngs):
        kw = _kw(cfg, rngs)
        self.layer_norm_input = LayerNorm(c_m, ax.EMBED, **kw)
        self.left_projection = Linear(c_m, c_opm, (ax.EMBED, ax.MLP), lora=_lora(cfg, "dense"), **kw)
        self.right_projection = Linear(c_m, c_opm, (ax.EMBED, ax.MLP), lora=_lora(cfg, "dense"), **kw)
        self.output_w = param(rngs, init.zeros, (c_opm, c_opm, c_z), (ax.MLP, None, ax.PAIR), cfg.param_dtype)
        self.output_b = param(rngs, init.zeros, (c_z,), (ax.PAIR,), cfg.param_dtype)
        self.cfg = cfg

    def __call__(self, m_bsrc, msa_mask_bsr):
        dt = self.cfg.dtype
        mask = msa_mask_bsr.astype(dt)[..., None]
        x = self.layer_norm_input(m_bsrc)
        a = checkpoint_name(mask * self.left_projection(x), remat.OPM_PROJ)
        b = checkpoint_name(mask * self.right_projection(x), remat.OPM_PROJ)
        norm = jnp.einsum("bsi,bsj->bij", mask[..., 0], mask[..., 0],
                          preferred_element_type=jnp.float32)[..., None]

        def fn(a_bsic, norm_bij1):
            outer = jnp.einsum("bsic,bsje->bijce", a_bsic, b)
            out = jnp.einsum("bijce,cef->bijf", outer, self.output_w[...].astype(dt)) + self.output_b[...].astype(dt)
            return (out / (OPM_EPS + norm_bij1)).astype(dt)
        return chunked(fn, self.cfg.chunk_size, (a, norm), (2, 1), 1, self.cfg.chunk_remat)


class TriangleMultiplication(nnx.Module):
    """Alg 11 (outgoing: z_ij += sum_k a_ik b_jk) and Alg 12 (incoming: z_ij += sum_k a_ki b_kj),
    with AlphaFold's parameter roles: for incoming edges its ``left_projection`` is the
    supplement's b and ``right_projection`` its a. Chunked over rows i: the chunked operand and
    the output gate come from the chunk (rows for outgoing, columns for incoming); the other
    operand is projected once for the whole pair."""

    def __init__(self, c_z: int, c_mid: int, outgoing: bool, cfg, *, rngs: nnx.Rngs):
        kw = _kw(cfg, rngs)
        self.layer_norm_input = LayerNorm(c_z, ax.PAIR, **kw)
        kw_lora = dict(kw, lora=_lora(cfg, "dense"))
        self.left_projection = Linear(c_z, c_mid, (ax.PAIR, ax.MLP), **kw_lora)
        self.right_projection = Linear(c_z, c_mid, (ax.PAIR, ax.MLP), **kw_lora)
        self.left_gate = Linear(c_z, c_mid, (ax.PAIR, ax.MLP), kind="final", bias_init=1.0, **kw_lora)
        self.right_gate = Linear(c_z, c_mid, (ax.PAIR, ax.MLP), kind="final", bias_init=1.0, **kw_lora)
        self.center_layer_norm = LayerNorm(c_mid, ax.MLP, **kw)
        self.output_projection = Linear(c_mid, c_z, (ax.MLP, ax.PAIR), kind="final", **kw_lora)
        self.gating_linear = Linear(c_z, c_z, (ax.PAIR, None), kind="final", bias_init=1.0, **kw_lora)
        self.cfg, self.outgoing = cfg, outgoing

    def _left(self, x, mask):
        return checkpoint_name(mask * self.left_projection(x) * jax.nn.sigmoid(self.left_gate(x)), remat.TRI_PROJ)

    def _right(self, x, mask):
        return checkpoint_name(mask * self.right_projection(x) * jax.nn.sigmoid(self.right_gate(x)), remat.TRI_PROJ)

    def __call__(self, z_brrc, pair_mask_brr):
        mask = pair_mask_brr.astype(self.cfg.dtype)[..., None]
        x = self.layer_norm_input(z_brrc)
        if self.outgoing:   # out[i, j] = sum_k left[i, k] right[j, k]; left from the row chunk
            right = self._right(x, mask)
            def product(x_rows, mask_rows, x_cols, mask_cols):
                return jnp.einsum("bikc,bjkc->bijc", self._left(x_rows, mask_rows), right)
        else:               # out[i, j] = sum_k left[k, j] right[k, i]; right from the column chunk
            left = self._left(x, mask)
            def product(x_rows, mask_rows, x_cols, mask_cols):
                return jnp.einsum("bkjc,bkic->bijc", left, self._right(x_cols, mask_cols))

        def fn(x_rows, mask_rows, x_cols, mask_cols):
            t = self.output_projection(self.center_layer_norm(product(x_rows, mask_rows, x_cols, mask_cols)))
            return t * jax.nn.sigmoid(self.gating_linear(x_rows))
        return chunked(fn, self.cfg.chunk_size, (x, mask, x, mask), (1, 1, 2, 2), 1, self.cfg.chunk_remat)


class TriangleAttention(nnx.Module):
    """Alg 13 (around the starting node: attention along rows, bias b_jk from the pair) and Alg 14
    (ending node: the same on the transposed pair). Chunked over rows (columns when ending)."""

    def __init__(self, c_z: int, heads: int, head_dim: int, starting: bool, cfg, *, rngs: nnx.Rngs):
        self.query_norm = LayerNorm(c_z, ax.PAIR, **_kw(cfg, rngs))
        self.feat_2d_weights = param(rngs, init.normal(c_z ** -0.5), (c_z, heads), (ax.PAIR, ax.HEADS),
                                     cfg.param_dtype)
        self.attention = Attention(c_z, heads, head_dim, cfg, rngs=rngs, channel_axis=ax.PAIR)
        self.cfg, self.starting = cfg, starting

    def __call__(self, z_brrc, pair_mask_brr):
        if not self.starting:
            z_brrc, pair_mask_brr = jnp.swapaxes(z_brrc, 1, 2), jnp.swapaxes(pair_mask_brr, 1, 2)
        x = self.query_norm(z_brrc)
        bias = _pair_bias(x, self.feat_2d_weights, self.cfg.dtype)
        fn = lambda x, mask: self.attention(x, bias, mask)  # noqa: E731
        out = chunked(fn, self.cfg.chunk_size, (x, pair_mask_brr), (1, 1), 1, self.cfg.chunk_remat)
        return out if self.starting else jnp.swapaxes(out, 1, 2)
