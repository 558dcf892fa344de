"""Chunked attention in O(N) memory: Rabe & Staats 2021, "Self-attention Does Not Need O(n^2) Memory".

Queries are cut into blocks of ``q_chunk`` rows and keys into blocks of ``kv_chunk`` rows.
The forward pass walks the key blocks for each query block with an online softmax (a
running max, normaliser and weighted sum), so only one [batch, heads, q_chunk, kv_chunk]
tile of logits lives at a time; it keeps the output and the per-row log-sum-exp. The
backward pass is a ``jax.custom_vjp`` that recomputes each tile from q, k, v and the
log-sum-exp (the FlashAttention-2 backward equations, written in plain JAX), so nothing
quadratic is stored for autodiff. Memory is linear in sequence length on any backend.

Supports any lengths (padded to whole blocks inside, padded keys masked), grouped-query
attention (kv heads repeated outside the custom VJP, whose transpose sums the groups),
boolean masks, segment ids of packed rows (compared tile by tile: a query attends only to keys
of its own segment, and no [Q, K] mask is formed), causal attention aligned at the end as in
``xla.py``, and an additive bias broadcastable to [batch, heads, q_len, kv_len] whose gradient
comes back in the bias's own shape (summed over its broadcast dimensions). A row with no key to
attend gives zeros.

Tiles nothing can attend are skipped, forward and backward: those causality hides entirely
(``lax.cond``) and, with segment ids, every tile outside the span of kv blocks a query block's
segments reach in some row of the batch (the loop over blocks runs from the first tile whose query
and key ids span overlapping ranges to the last; exact for any ids, and for packed rows, whose ids
rise along the row, exactly the tiles where some row holds one piece on both sides). A loop with
data-dependent bounds rather than a ``lax.cond`` per tile: on CPU the conds cost about what they
saved (``benchmarks/packed_attention.py``).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

DEFAULT_Q_CHUNK = 256
DEFAULT_KV_CHUNK = 512
# The defaults with segment ids (packed rows) on CPU, where smaller tiles skip more and cost little
# per tile; on a GPU each tile costs a loop trip, and 256 x 512 measured faster there too (H200,
# bf16, 20 heads of 64: 23 against 40 ms at 4,096 positions, 20 against 31 at 2,048;
# benchmarks/results/packed_attention_nvidia_h200.md).
SEGMENT_Q_CHUNK = 128
SEGMENT_KV_CHUNK = 128


class _Spec(NamedTuple):
    """Static facts the custom VJP closes over (hashable)."""
    q_len: int      # unpadded query length
    kv_len: int     # unpadded key length
    q_block: int
    kv_block: int
    causal: bool
    scale: float


def chunked_attention(q_bqhd, k_bkhd, v_bkhd, *, bias=None, mask=None, causal=False, scale=None,
                      segment_ids=None, q_chunk: int | None = None, kv_chunk: int | None = None):
    """Memory-efficient exact attention. q [B,Q,H,D], k/v [B,K,Hkv,D]; bias/mask broadcast to [B,H,Q,K];
    ``segment_ids``: (query ids [B,Q], key ids [B,K]), a query attends only to keys with its id.
    Tiles: ``q_chunk`` x ``kv_chunk``, by default 256 x 512, or 128 x 128 with segment ids on CPU."""
    small_tiles = segment_ids is not None and jax.default_backend() == "cpu"
    q_chunk = (SEGMENT_Q_CHUNK if small_tiles else DEFAULT_Q_CHUNK) if q_chunk is None else q_chunk
    kv_chunk = (SEGMENT_KV_CHUNK if small_tiles else DEFAULT_KV_CHUNK) if kv_chunk is None else kv_chunk
    for label, size in (("q_chunk", q_chunk), ("kv_chunk", kv_chunk)):
        if not isinstance(size, int) or size < 1:
            raise ValueError(f"{label} must be a positive int, got {size!r}")
    batch, q_len, num_heads, head_dim = q_bqhd.shape
    kv_len, kv_heads = k_bkhd.shape[1], k_bkhd.shape[2]
    scale = head_dim ** -0.5 if scale is None else float(scale)
    if kv_heads != num_heads:  # GQA: the repeat's transpose sums each group's gradients
        k_bkhd = jnp.repeat(k_bkhd, num_heads // kv_heads, axis=2)
        v_bkhd = jnp.repeat(v_bkhd, num_heads // kv_heads, axis=2)
    q_block, kv_block = min(q_chunk, q_len), min(kv_chunk, kv_len)
    q_pad = -q_len % q_block
    kv_pad = -kv_len % kv_block
    q_bqhd = jnp.pad(q_bqhd, ((0, 0), (0, q_pad), (0, 0), (0, 0)))
    k_bkhd = jnp.pad(k_bkhd, ((0, 0), (0, kv_pad), (0, 0), (0, 0)))
    v_bkhd = jnp.pad(v_bkhd, ((0, 0), (0, kv_pad), (0, 0), (0, 0)))
    # Bias and mask become 4-D; a dimension of size 1 stays broadcast, a full one is padded.
    bias_4d = None if bias is None else _pad_qk(_as_4d(jnp.asarray(bias)), q_pad, kv_pad, 0)
    mask_4d = None if mask is None else _pad_qk(_as_4d(jnp.asarray(mask, bool)), q_pad, kv_pad, False)
    q_seg = kv_seg = None
    if segment_ids is not None:  # [B,1,Q,1] and [B,1,1,K]; padded positions match nothing
        q_ids, kv_ids = (jnp.asarray(x, jnp.int32) for x in segment_ids)
        q_seg = jnp.pad(q_ids, ((0, 0), (0, q_pad)), constant_values=-1)[:, None, :, None]
        kv_seg = jnp.pad(kv_ids, ((0, 0), (0, kv_pad)), constant_values=-2)[:, None, None, :]
    spec = _Spec(q_len, kv_len, q_block, kv_block, bool(causal), scale)
    out_bqhd = _attention(spec, q_bqhd, k_bkhd, v_bkhd, bias_4d, mask_4d, q_seg, kv_seg)
    return out_bqhd[:, :q_len]


def _as_4d(x):
    return x.reshape((1,) * (4 - x.ndim) + tuple(x.shape))


def _pad_qk(x, q_pad, kv_pad, value):
    pads = [(0, 0), (0, 0), (0, q_pad if x.shape[2] != 1 else 0), (0, kv_pad if x.shape[3] != 1 else 0)]
    return jnp.pad(x, pads, constant_values=value)


def _slice_qk(x, qi, ki, spec):
    """The [.., q_block, kv_block] tile (qi, ki) of a bias or mask, keeping broadcast dims of size 1."""
    if x.shape[2] != 1:
        x = lax.dynamic_slice_in_dim(x, qi * spec.q_block, spec.q_block, axis=2)
    if x.shape[3] != 1:
        x = lax.dynamic_slice_in_dim(x, ki * spec.kv_block, spec.kv_block, axis=3)
    return x


def _tile_logits(spec, q_blk, k_blk, bias, mask, qi, ki, q_seg=None, kv_seg=None):
    """Scaled logits of tile (qi, ki) in float32, [B,H,qb,kb], with -inf where a key is not attended."""
    s_bhqk = jnp.einsum("bqhd,bkhd->bhqk", q_blk, k_blk, preferred_element_type=jnp.float32) * spec.scale
    if bias is not None:
        s_bhqk = s_bhqk + _slice_qk(bias, qi, ki, spec).astype(jnp.float32)
    q_pos = qi * spec.q_block + jnp.arange(spec.q_block)
    k_pos = ki * spec.kv_block + jnp.arange(spec.kv_block)
    valid_qk = jnp.broadcast_to(k_pos[None, :] < spec.kv_len, (spec.q_block, spec.kv_block))
    if spec.causal:  # query i sees key j <= i + (kv_len - q_len)
        valid_qk = valid_qk & (k_pos[None, :] <= q_pos[:, None] + (spec.kv_len - spec.q_len))
    valid = valid_qk if mask is None else valid_qk & _slice_qk(mask, qi, ki, spec)
    if q_seg is not None:
        valid = valid & (_slice_qk(q_seg, qi, ki, spec) == _slice_qk(kv_seg, qi, ki, spec))
    return jnp.where(valid, s_bhqk, -jnp.inf)


def tiles_meeting(q_ids, kv_ids, q_block: int, kv_block: int):
    """[num_q_blocks, num_kv_blocks] bool: False where, in every row, the query ids of a q block and
    the key ids of a kv block span disjoint ranges, so no query of the tile can attend a key of it.
    q_ids [B, Q] and kv_ids [B, K] with Q, K whole multiples of the block sizes."""
    def ranges(ids, block):
        tiles = ids.reshape(ids.shape[0], -1, block)
        return tiles.min(axis=-1), tiles.max(axis=-1)  # [B, n]
    q_lo, q_hi = ranges(q_ids, q_block)
    k_lo, k_hi = ranges(kv_ids, kv_block)
    meet = (q_lo[:, :, None] <= k_hi[:, None, :]) & (k_lo[:, None, :] <= q_hi[:, :, None])
    return meet.any(axis=0)


def _tile_map(spec, q_seg, kv_seg):
    """The tiles that may hold an attended pair (``tiles_meeting``), or None without segment ids."""
    if q_seg is None:
        return None
    return tiles_meeting(q_seg[:, 0, :, 0], kv_seg[:, 0, 0, :], spec.q_block, spec.kv_block)


def _unless_hidden(spec, qi, ki, update, carry):
    """update(carry) for tile (qi, ki), skipped when causality hides every key of the tile."""
    if not spec.causal:
        return update(carry)
    last_visible_key = qi * spec.q_block + spec.q_block - 1 + (spec.kv_len - spec.q_len)
    return lax.cond(ki * spec.kv_block <= last_visible_key, update, lambda c: c, carry)


def _spans(spec, meets):
    """Per query block, the kv blocks [first, stop) from the first to the last tile that may hold an
    attended pair (``meets`` [num_q, num_kv], from ``_tile_map``, and not hidden by causality):
    (first, stop), each [num_q]. For ids that rise along the row the tiles between are exactly
    those; for others some may hold no pair (computed, every pair masked). No tile: first == stop."""
    num_q, num_kv = meets.shape
    if spec.causal:
        q_last = np.arange(num_q)[:, None] * spec.q_block + spec.q_block - 1 + (spec.kv_len - spec.q_len)
        meets = meets & (np.arange(num_kv)[None, :] * spec.kv_block <= q_last)
    return _first_stop(meets)


def _first_stop(tiles):
    """(first, stop) per row of a bool matrix: from its first True to one past its last True."""
    index = jnp.arange(tiles.shape[1])
    first = jnp.min(jnp.where(tiles, index, tiles.shape[1]), axis=1)
    stop = jnp.max(jnp.where(tiles, index + 1, 0), axis=1)
    return first, jnp.maximum(stop, first)


def _reach(spans, num_kv):
    """Per kv block, the query blocks [first, stop) whose forward span covers it: the backward
    visits the forward's tiles (and, where those are not contiguous, empty ones between)."""
    index = jnp.arange(num_kv)
    inside = (spans[0][:, None] <= index[None, :]) & (index[None, :] < spans[1][:, None])
    return _first_stop(inside.T)


def _forward(spec, q_bqhd, k_bkhd, v_bkhd, bias, mask, q_seg=None, kv_seg=None):
    batch, q_padded, num_heads, head_dim = q_bqhd.shape
    num_q, num_kv = q_padded // spec.q_block, k_bkhd.shape[1] // spec.kv_block
    meets = _tile_map(spec, q_seg, kv_seg)
    spans = None if meets is None else _spans(spec, meets)

    def one_query_block(qi):
        q_blk = lax.dynamic_slice_in_dim(q_bqhd, qi * spec.q_block, spec.q_block, axis=1)

        def kv_step(carry, ki):
            return _unless_hidden(spec, qi, ki, functools.partial(kv_update, ki=ki), carry), None

        def kv_update(carry, ki):
            max_bhq, norm_bhq, acc_bhqd = carry
            k_blk = lax.dynamic_slice_in_dim(k_bkhd, ki * spec.kv_block, spec.kv_block, axis=1)
            v_blk = lax.dynamic_slice_in_dim(v_bkhd, ki * spec.kv_block, spec.kv_block, axis=1)
            s_bhqk = _tile_logits(spec, q_blk, k_blk, bias, mask, qi, ki, q_seg, kv_seg)
            new_max = jnp.maximum(max_bhq, s_bhqk.max(axis=-1))
            safe_max = jnp.where(jnp.isfinite(new_max), new_max, 0.0)  # all -inf so far: no NaN
            p_bhqk = jnp.exp(s_bhqk - safe_max[..., None])
            correction = jnp.exp(max_bhq - safe_max)
            norm_bhq = norm_bhq * correction + p_bhqk.sum(axis=-1)
            pv_bhqd = jnp.einsum("bhqk,bkhd->bhqd", p_bhqk.astype(v_blk.dtype), v_blk,
                                 preferred_element_type=jnp.float32)
            return new_max, norm_bhq, acc_bhqd * correction[..., None] + pv_bhqd

        stats_shape = (batch, num_heads, spec.q_block)
        init = _varying_as((jnp.full(stats_shape, -jnp.inf, jnp.float32), jnp.zeros(stats_shape, jnp.float32),
                            jnp.zeros(stats_shape + (head_dim,), jnp.float32)), q_bqhd, k_bkhd, v_bkhd, bias, mask,
                           q_seg, kv_seg)
        if spans is None:
            (max_bhq, norm_bhq, acc_bhqd), _ = lax.scan(kv_step, init, jnp.arange(num_kv))
        else:  # only the kv blocks the query block's segments reach
            max_bhq, norm_bhq, acc_bhqd = lax.fori_loop(spans[0][qi], spans[1][qi],
                                                        lambda ki, c: kv_update(c, ki), init)
        attended = norm_bhq > 0
        out_bhqd = acc_bhqd / jnp.where(attended, norm_bhq, 1.0)[..., None]
        lse_bhq = jnp.where(attended, max_bhq + jnp.log(jnp.where(attended, norm_bhq, 1.0)), jnp.inf)
        return out_bhqd.transpose(0, 2, 1, 3).astype(q_bqhd.dtype), lse_bhq

    out_nbqhd, lse_nbhq = lax.map(one_query_block, jnp.arange(num_q))
    out_bqhd = out_nbqhd.transpose(1, 0, 2, 3, 4).reshape(q_bqhd.shape)
    lse_bhq = lse_nbhq.transpose(1, 2, 0, 3).reshape(batch, num_heads, q_padded)
    return out_bqhd, lse_bhq


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _attention(spec, q_bqhd, k_bkhd, v_bkhd, bias, mask, q_seg, kv_seg):
    return _forward(spec, q_bqhd, k_bkhd, v_bkhd, bias, mask, q_seg, kv_seg)[0]


def _attention_fwd(spec, q_bqhd, k_bkhd, v_bkhd, bias, mask, q_seg, kv_seg):
    out_bqhd, lse_bhq = _forward(spec, q_bqhd, k_bkhd, v_bkhd, bias, mask, q_seg, kv_seg)
    return out_bqhd, (q_bqhd, k_bkhd, v_bkhd, bias, mask, q_seg, kv_seg, out_bqhd, lse_bhq)


def _attention_bwd(spec, residuals, dout_bqhd):
    q_bqhd, k_bkhd, v_bkhd, bias, mask, q_seg, kv_seg, out_bqhd, lse_bhq = residuals
    num_q, num_kv = q_bqhd.shape[1] // spec.q_block, k_bkhd.shape[1] // spec.kv_block
    # delta_i = sum_d dO_id O_id = sum_j P_ij dP_ij, the softmax-backward row term.
    delta_bhq = jnp.einsum("bqhd,bqhd->bhq", dout_bqhd.astype(jnp.float32), out_bqhd.astype(jnp.float32))
    meets = _tile_map(spec, q_seg, kv_seg)
    spans = None if meets is None else _reach(_spans(spec, meets), num_kv)  # per kv block

    def one_kv_block(carry, ki):
        k_blk = lax.dynamic_slice_in_dim(k_bkhd, ki * spec.kv_block, spec.kv_block, axis=1)
        v_blk = lax.dynamic_slice_in_dim(v_bkhd, ki * spec.kv_block, spec.kv_block, axis=1)

        def q_step(inner, qi):
            return _unless_hidden(spec, qi, ki, functools.partial(q_update, qi=qi), inner), None

        def q_update(inner, qi):
            dk_bkhd, dv_bkhd, dq_bqhd, dbias = inner
            dk_add, dv_add, dq_blk, ds_bhqk = tile_grads(qi)
            start = qi * spec.q_block
            dq_bqhd = lax.dynamic_update_slice_in_dim(
                dq_bqhd, lax.dynamic_slice_in_dim(dq_bqhd, start, spec.q_block, axis=1) + dq_blk, start, axis=1)
            if dbias is not None:
                dbias = _accumulate_bias_grad(spec, dbias, ds_bhqk, qi, ki)
            return dk_bkhd + dk_add, dv_bkhd + dv_add, dq_bqhd, dbias

        def tile_grads(qi):
            start = qi * spec.q_block
            q_blk = lax.dynamic_slice_in_dim(q_bqhd, start, spec.q_block, axis=1)
            do_blk = lax.dynamic_slice_in_dim(dout_bqhd, start, spec.q_block, axis=1)
            lse_blk = lax.dynamic_slice_in_dim(lse_bhq, start, spec.q_block, axis=2)
            delta_blk = lax.dynamic_slice_in_dim(delta_bhq, start, spec.q_block, axis=2)
            s_bhqk = _tile_logits(spec, q_blk, k_blk, bias, mask, qi, ki, q_seg, kv_seg)
            p_bhqk = jnp.exp(s_bhqk - lse_blk[..., None])  # masked or empty rows: exactly 0
            dv_add = jnp.einsum("bhqk,bqhd->bkhd", p_bhqk.astype(do_blk.dtype), do_blk,
                                preferred_element_type=jnp.float32)
            dp_bhqk = jnp.einsum("bqhd,bkhd->bhqk", do_blk, v_blk, preferred_element_type=jnp.float32)
            ds_bhqk = p_bhqk * (dp_bhqk - delta_blk[..., None])  # d loss / d logits (= d bias)
            dq_blk = jnp.einsum("bhqk,bkhd->bqhd", ds_bhqk.astype(k_blk.dtype), k_blk,
                                preferred_element_type=jnp.float32) * spec.scale
            dk_add = jnp.einsum("bhqk,bqhd->bkhd", ds_bhqk.astype(q_blk.dtype), q_blk,
                                preferred_element_type=jnp.float32) * spec.scale
            return dk_add, dv_add, dq_blk, ds_bhqk if bias is not None else None

        dq_bqhd, dbias = carry
        zeros_kv = _varying_as(jnp.zeros(k_blk.shape, jnp.float32), *residuals, dout_bqhd)
        inner = (zeros_kv, zeros_kv, dq_bqhd, dbias)
        if spans is None:
            (dk_bkhd, dv_bkhd, dq_bqhd, dbias), _ = lax.scan(q_step, inner, jnp.arange(num_q))
        else:  # only the query blocks whose segments reach this kv block
            dk_bkhd, dv_bkhd, dq_bqhd, dbias = lax.fori_loop(spans[0][ki], spans[1][ki],
                                                             lambda qi, c: q_update(c, qi), inner)
        return (dq_bqhd, dbias), (dk_bkhd, dv_bkhd)

    init = _varying_as((jnp.zeros(q_bqhd.shape, jnp.float32),
                        None if bias is None else jnp.zeros(bias.shape, jnp.float32)), *residuals, dout_bqhd)
    (dq_bqhd, dbias), (dk_nbkhd, dv_nbkhd) = lax.scan(one_kv_block, init, jnp.arange(num_kv))
    dk_bkhd = dk_nbkhd.transpose(1, 0, 2, 3, 4).reshape(k_bkhd.shape)
    dv_bkhd = dv_nbkhd.transpose(1, 0, 2, 3, 4).reshape(v_bkhd.shape)
    dbias = None if bias is None else _sum_to_vma(dbias, bias).astype(bias.dtype)
    return (dq_bqhd.astype(q_bqhd.dtype), dk_bkhd.astype(k_bkhd.dtype), dv_bkhd.astype(v_bkhd.dtype),
            dbias, None, None, None)


def _vma(x) -> frozenset:
    """The manual mesh axes ``x`` varies over inside ``jax.shard_map`` (empty outside); jax 0.10 keeps
    them in ``aval.mat.varying``, earlier releases in ``aval.vma``."""
    if x is None:
        return frozenset()
    aval = jax.typeof(x)
    mat = getattr(aval, "mat", None)
    return frozenset(mat.varying if mat is not None else getattr(aval, "vma", ()))


def _varying_as(init, *operands):
    """Scan carries ``init`` cast to vary over every manual mesh axis any operand varies over, so a
    carry's type matches the body's output inside ``jax.shard_map`` (an identity outside)."""
    axes = frozenset().union(*map(_vma, operands))

    def cast(x):
        extra = tuple(sorted(axes - _vma(x)))
        return lax.pcast(x, extra, to="varying") if extra else x
    return jax.tree.map(cast, init)


def _sum_to_vma(grad, primal):
    """A cotangent that varies over more manual axes than its primal, summed over those axes (the
    transpose of using an axis-invariant value in per-device computation)."""
    extra = tuple(sorted(_vma(grad) - _vma(primal)))
    return lax.psum(grad, extra) if extra else grad


def _accumulate_bias_grad(spec, dbias, ds_bhqk, qi, ki):
    """Add a tile's logit gradient into the bias gradient, summed over the bias's broadcast dims."""
    broadcast_axes = tuple(i for i in range(4) if dbias.shape[i] == 1 and ds_bhqk.shape[i] != 1)
    ds_tile = ds_bhqk.sum(axis=broadcast_axes, keepdims=True) if broadcast_axes else ds_bhqk
    q_start = qi * spec.q_block if dbias.shape[2] != 1 else 0
    k_start = ki * spec.kv_block if dbias.shape[3] != 1 else 0
    starts = (0, 0, q_start, k_start)
    current = lax.dynamic_slice(dbias, starts, ds_tile.shape)
    return lax.dynamic_update_slice(dbias, current + ds_tile, starts)


_attention.defvjp(_attention_fwd, _attention_bwd)
