"""Flash attention in Pallas: forward and backward, with an additive bias and its gradient.

FlashAttention (Dao et al., 2022, arXiv:2205.14135) tiles softmax(q k^T * scale + bias) v
so the [Q, K] logits never reach main memory; FlashAttention-2 (Dao, 2023,
arXiv:2307.08691) partitions the work as done here:

- forward: one program per (batch, head, query block) walks the key blocks with an online
  softmax and saves the row logsumexp (lse);
- backward: a dK/dV kernel (one program per key block, walking query blocks) and a dQ
  kernel (one program per query block, walking key blocks) recompute the probabilities
  from the lse. The dQ kernel also emits the bias gradient block by block; it is then
  summed over the dimensions the user's bias was broadcast over.

Packed rows: with segment ids (one int per query and per key) a query attends only to keys of its
own segment; the ids are read per tile beside q and k, so no [Q, K] mask is formed, and a tile
whose query ids and key ids span disjoint ranges (for packed rows: every tile joining two
different pieces) is skipped, in all three kernels.

Causal blocks above the diagonal are skipped. Sequences are padded inside to the block
sizes (padded keys masked), head_dim to a power of two. Rows whose every key is masked
give zeros (their lse is stored as +inf so the backward sees zero probabilities).
Accumulation is float32 for float32, bfloat16 and float16 inputs. GQA: k/v heads are
shared by ``heads // kv_heads`` query heads; dK/dV are summed over each group.

Backends: Triton lowering on GPU, Mosaic on TPU (whole-row K/V blocks, so long sequences
may exceed VMEM), ``interpret=True`` elsewhere. Memory note: a bias that varies along
both q_len and kv_len gets a per-(batch, head) float32 gradient buffer before the sum.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

_DTYPES = tuple(jnp.dtype(t) for t in (jnp.float32, jnp.bfloat16, jnp.float16))
_MAX_HEAD_DIM = 256
_NT = (((1,), (1,)), ((), ()))  # a @ b.T
_TN = (((0,), (0,)), ((), ()))  # a.T @ b
_NN = (((1,), (0,)), ((), ()))  # a @ b


@dataclasses.dataclass(frozen=True)
class _Cfg:
    """Static description of one call, shared by the kernels (hashable for custom_vjp)."""
    scale: float
    causal: bool
    q_len: int            # unpadded lengths: the causal offset and key padding use them
    kv_len: int
    block_q: int
    block_k: int
    bwd_blocks: tuple     # (block_q, block_k) of the backward kernels
    groups: int           # query heads per kv head
    bias_shape: tuple | None  # padded 4-D bias shape, size-1 dims kept
    mask_shape: tuple | None
    segments: bool        # query and key segment ids follow the bias and mask
    bhsd: bool            # kernel layout [B,H,S,D] (TPU) instead of the user's [B,S,H,D]
    interpret: bool
    backend: str


# ----------------------------------------------------------------------------- specs

def _seq_spec(cfg, rows, d, idx):
    """Block of `rows` positions of one head; idx(*grid) -> (b, h, row_block)."""
    if cfg.bhsd:
        return pl.BlockSpec((None, None, rows, d), lambda *g: (*idx(*g), 0))
    return pl.BlockSpec((None, rows, None, d), lambda *g: (lambda b, h, i: (b, i, h, 0))(*idx(*g)))


def _stat_spec(rows, idx):
    """Per-row statistic stored as [B, H, Q, 1] (lse, delta)."""
    return pl.BlockSpec((None, None, rows, 1), lambda *g: (*idx(*g), 0))


def _pair_spec(shape, rows, cols, idx):
    """Block of a bias/mask of `shape` broadcastable to [B,H,Q,K]; size-1 dims stay 1."""
    block = (None, None, rows if shape[2] > 1 else 1, cols if shape[3] > 1 else 1)

    def index(*g):
        return tuple(i if n > 1 else 0 for i, n in zip(idx(*g), shape))
    return pl.BlockSpec(block, index)


def _tile(ref, r0, rows, c0, cols):
    """A [rows|1, cols|1] tile of a bias/mask block, at local offsets where the dim is > 1."""
    return ref[pl.ds(r0, rows) if ref.shape[0] > 1 else slice(None),
               pl.ds(c0, cols) if ref.shape[1] > 1 else slice(None)]


def _params(cfg, dims, d):
    if cfg.interpret:
        return None
    if cfg.backend == "gpu":
        from jax.experimental.pallas import triton as pltriton
        return pltriton.CompilerParams(num_warps=4 if d <= 64 else 8, num_stages=2)
    if cfg.backend == "tpu":
        from jax.experimental.pallas import tpu as pltpu
        return pltpu.CompilerParams(dimension_semantics=("parallel",) * dims)
    return None


# ----------------------------------------------------------------------------- kernels

def _logits(cfg, q_qd, k_kd, bias_ref, masks, q0, k0, rq, rk, edge):
    """Masked float32 logits of one [bq, bk] tile; q0/k0 global offsets, rq/rk in the refs;
    ``masks``: (mask ref, query segment ref, key segment ref), each None where absent.

    ``edge`` (static): the tile may hold causal or padded positions, so build that mask."""
    bq, bk = q_qd.shape[0], k_kd.shape[0]
    mask_ref, q_seg_ref, k_seg_ref = masks
    s_qk = lax.dot_general(q_qd, k_kd, _NT, preferred_element_type=jnp.float32) * cfg.scale
    if bias_ref is not None:
        s_qk = s_qk + _tile(bias_ref, rq, bq, rk, bk).astype(jnp.float32)
    valid = None
    if mask_ref is not None:
        valid = _tile(mask_ref, rq, bq, rk, bk) != 0
    if q_seg_ref is not None:  # [bq, 1] == [1, bk]
        same = _tile(q_seg_ref, rq, bq, rk, bk) == _tile(k_seg_ref, rq, bq, rk, bk)
        valid = same if valid is None else valid & same
    if edge:
        col = k0 + lax.broadcasted_iota(jnp.int32, (bq, bk), 1)
        ok = col < cfg.kv_len
        if cfg.causal:  # query i sees keys j <= i + (kv_len - q_len), aligned at the end
            row = q0 + lax.broadcasted_iota(jnp.int32, (bq, bk), 0)
            ok = ok & (col <= row + (cfg.kv_len - cfg.q_len))
        valid = ok if valid is None else valid & ok
    if valid is not None:
        s_qk = jnp.where(valid, s_qk, -jnp.inf)
    return s_qk


def _ids_range(ref, r0, rows, c0, cols):
    """(min, max) of the segment ids in a tile of an id block ([rows, 1] queries or [1, cols] keys)."""
    ids = _tile(ref, r0, rows, c0, cols)
    return jnp.min(ids), jnp.max(ids)


def _unless_apart(cfg, body, q_range, k_range, skip=None):
    """``body(edge, idx, carry)`` run only where the tile's query and key ids can meet: ``q_range(idx)``
    and ``k_range(idx)`` give the (min, max) ids of its queries and keys; disjoint ranges hold no
    equal pair, so the tile is skipped (``skip(idx, carry)``, identity by default). Without segment
    ids, ``body`` itself."""
    if not cfg.segments:
        return body

    def run(edge, idx, carry):
        (q_lo, q_hi), (k_lo, k_hi) = q_range(idx), k_range(idx)
        meet = (q_lo <= k_hi) & (k_lo <= q_hi)
        return lax.cond(meet, functools.partial(body, edge, idx),
                        (lambda c: c) if skip is None else functools.partial(skip, idx), carry)
    return run


def _div(a, b):
    """a // b for a traced non-negative int a (program ids are int32) and a static int b.

    ``lax.div`` does not promote: b is made a constant of a's dtype, so the index arithmetic
    stays int32 also under ``jax_enable_x64`` (where a bare Python int would be int64)."""
    a = jnp.asarray(a)
    return lax.div(a, jnp.asarray(b, a.dtype))


def _div_up(a, b):
    """ceil(max(a, 0) / b) for a traced int a and a static int b."""
    return _div(jnp.maximum(a, 0) + b - 1, b)


def _k_ranges(cfg, i, nk):
    """Key blocks for query block i: [0, free) need no causal/padding mask, [free, hi) do.

    The last block is masked whenever keys are padded, also under causal masking where only
    padded queries could reach padded keys: forward and dQ then agree on every row's lse."""
    padded_k = nk * cfg.block_k != cfg.kv_len
    if not cfg.causal:
        return (nk - 1, nk) if padded_k else (nk, nk)
    off = cfg.kv_len - cfg.q_len
    hi = jnp.minimum(_div_up((i + 1) * cfg.block_q + off, cfg.block_k), nk)  # beyond: all hidden
    free = jnp.minimum(_div(jnp.maximum(i * cfg.block_q + off + 1, 0), cfg.block_k), hi)
    return (jnp.minimum(free, nk - 1) if padded_k else free), hi


def _q_ranges(cfg, j, nq):
    """Query blocks for key block j: [lo, free) need the causal mask, [free, nq) do not.

    Padded keys need no mask here: they only change their own dK/dV rows, which are dropped;
    padded queries carry dO = 0 and so add nothing to real keys."""
    if not cfg.causal:
        return 0, 0
    off = cfg.kv_len - cfg.q_len
    lo = jnp.minimum(_div(jnp.maximum(j * cfg.block_k - off, 0), cfg.block_q), nq)
    return lo, jnp.clip(_div_up((j + 1) * cfg.block_k - 1 - off, cfg.block_q), lo, nq)


def _loop(lo, mid, hi, body, carry):
    """body(edge, idx, carry) over [lo, mid) with edge=False, then [mid, hi) with edge=True."""
    for edge, start, stop in ((False, lo, mid), (True, mid, hi)):
        if not (isinstance(start, int) and isinstance(stop, int) and start >= stop):
            carry = lax.fori_loop(start, stop, functools.partial(body, edge), carry)
    return carry


def _split(refs, cfg, n_in):
    """(base input refs, bias ref, (mask ref, query and key segment refs), output refs); bias,
    mask and segment ids follow the base."""
    n_base = n_in - bool(cfg.bias_shape) - bool(cfg.mask_shape) - 2 * cfg.segments
    extra = list(refs[n_base:n_in])
    bias_ref = extra.pop(0) if cfg.bias_shape else None
    mask_ref = extra.pop(0) if cfg.mask_shape else None
    q_seg_ref, k_seg_ref = (extra.pop(0), extra.pop(0)) if cfg.segments else (None, None)
    return refs[:n_base], bias_ref, (mask_ref, q_seg_ref, k_seg_ref), refs[n_in:]


def _fwd_kernel(*refs, cfg, nk, n_in):
    (q_ref, k_ref, v_ref), bias_ref, mask_ref, (o_ref, lse_ref) = _split(refs, cfg, n_in)
    bq, bk = cfg.block_q, cfg.block_k
    i = pl.program_id(2)
    q_qd = q_ref[...]

    def body(edge, j, carry):
        acc_qd, m_q1, l_q1 = carry
        k_kd = k_ref[pl.ds(j * bk, bk), :]
        v_kd = v_ref[pl.ds(j * bk, bk), :]
        s_qk = _logits(cfg, q_qd, k_kd, bias_ref, mask_ref, i * bq, j * bk, 0, j * bk, edge)
        m_new = jnp.maximum(m_q1, jnp.max(s_qk, axis=1, keepdims=True))
        m_use = jnp.where(m_new == -jnp.inf, 0.0, m_new)  # nothing seen yet: keep exp finite
        p_qk = jnp.exp(s_qk - m_use)
        alpha = jnp.exp(m_q1 - m_use)
        l_q1 = alpha * l_q1 + jnp.sum(p_qk, axis=1, keepdims=True)
        pv_qd = lax.dot_general(p_qk.astype(v_kd.dtype), v_kd, _NN, preferred_element_type=jnp.float32)
        return alpha * acc_qd + pv_qd, m_new, l_q1

    if cfg.segments:
        _, q_seg_ref, k_seg_ref = mask_ref
        q_ids = _ids_range(q_seg_ref, 0, bq, 0, bk)  # this program's queries: one range for every tile
        body = _unless_apart(cfg, body, lambda j: q_ids, lambda j: _ids_range(k_seg_ref, 0, bq, j * bk, bk))
    # Row statistics are [bq, 1] columns (2-D keeps Mosaic happy; Triton takes either).
    init = (jnp.zeros(q_qd.shape, jnp.float32), jnp.full((bq, 1), -jnp.inf, jnp.float32),
            jnp.zeros((bq, 1), jnp.float32))
    acc_qd, m_q1, l_q1 = _loop(0, *_k_ranges(cfg, i, nk), body, init)
    empty = l_q1 == 0.0
    o_ref[...] = (acc_qd / jnp.where(empty, 1.0, l_q1)).astype(o_ref.dtype)
    lse_ref[...] = jnp.where(empty, jnp.inf, m_q1 + jnp.log(jnp.where(empty, 1.0, l_q1)))


def _dkdv_kernel(*refs, cfg, nq, n_in):
    (q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref), bias_ref, mask_ref, (dk_ref, dv_ref) = \
        _split(refs, cfg, n_in)
    bq, bk = cfg.block_q, cfg.block_k
    j = pl.program_id(2)
    k_kd, v_kd = k_ref[...], v_ref[...]

    def body(edge, i, carry):
        dk_kd, dv_kd = carry
        rows = pl.ds(i * bq, bq)
        q_qd, do_qd = q_ref[rows, :], do_ref[rows, :]
        s_qk = _logits(cfg, q_qd, k_kd, bias_ref, mask_ref, i * bq, j * bk, i * bq, 0, edge)
        p_qk = jnp.exp(s_qk - lse_ref[rows, :])
        dv_kd = dv_kd + lax.dot_general(p_qk.astype(do_qd.dtype), do_qd, _TN,
                                        preferred_element_type=jnp.float32)
        dp_qk = lax.dot_general(do_qd, v_kd, _NT, preferred_element_type=jnp.float32)
        ds_qk = p_qk * (dp_qk - delta_ref[rows, :])
        dk_kd = dk_kd + lax.dot_general(ds_qk.astype(q_qd.dtype), q_qd, _TN,
                                        preferred_element_type=jnp.float32)
        return dk_kd, dv_kd

    if cfg.segments:
        _, q_seg_ref, k_seg_ref = mask_ref
        k_ids = _ids_range(k_seg_ref, 0, bq, 0, bk)  # this program's keys
        body = _unless_apart(cfg, body, lambda i: _ids_range(q_seg_ref, i * bq, bq, 0, bk), lambda i: k_ids)
    lo, free = _q_ranges(cfg, j, nq)
    zeros = jnp.zeros(k_kd.shape, jnp.float32)
    carry = (zeros, zeros)
    if cfg.causal:
        carry = lax.fori_loop(lo, free, functools.partial(body, True), carry)
    dk_kd, dv_kd = lax.fori_loop(free, nq, functools.partial(body, False), carry)
    dk_ref[...] = (dk_kd * cfg.scale).astype(dk_ref.dtype)
    dv_ref[...] = dv_kd.astype(dv_ref.dtype)


def _dq_kernel(*refs, cfg, nk, n_in):
    (q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref), bias_ref, mask_ref, outs = \
        _split(refs, cfg, n_in)
    dq_ref, db_ref = (outs[0], outs[1]) if len(outs) == 2 else (outs[0], None)
    bq, bk = cfg.block_q, cfg.block_k
    i = pl.program_id(2)
    q_qd, do_qd, lse_q1, delta_q1 = q_ref[...], do_ref[...], lse_ref[...], delta_ref[...]
    full_k = db_ref is not None and db_ref.shape[1] > 1

    def body(edge, j, carry):
        dq_qd, db_q1 = carry
        k_kd = k_ref[pl.ds(j * bk, bk), :]
        v_kd = v_ref[pl.ds(j * bk, bk), :]
        s_qk = _logits(cfg, q_qd, k_kd, bias_ref, mask_ref, i * bq, j * bk, 0, j * bk, edge)
        p_qk = jnp.exp(s_qk - lse_q1)
        dp_qk = lax.dot_general(do_qd, v_kd, _NT, preferred_element_type=jnp.float32)
        ds_qk = p_qk * (dp_qk - delta_q1)
        dq_qd = dq_qd + lax.dot_general(ds_qk.astype(k_kd.dtype), k_kd, _NN,
                                        preferred_element_type=jnp.float32)
        if db_ref is not None:
            if db_ref.shape[0] == 1:  # bias broadcast over queries: this block's column sums
                ds_qk = jnp.sum(ds_qk, axis=0, keepdims=True)
            if full_k:
                db_ref[:, pl.ds(j * bk, bk)] = ds_qk.astype(db_ref.dtype)
            else:  # bias broadcast over keys: row sums
                db_q1 = db_q1 + jnp.sum(ds_qk, axis=1, keepdims=True)
        return dq_qd, db_q1

    rows = 1 if db_ref is None else db_ref.shape[0]
    if cfg.segments:
        _, q_seg_ref, k_seg_ref = mask_ref
        q_ids = _ids_range(q_seg_ref, 0, bq, 0, bk)

        def skip(j, carry):  # a skipped tile's bias gradient is zero
            if full_k:
                db_ref[:, pl.ds(j * bk, bk)] = jnp.zeros((rows, bk), db_ref.dtype)
            return carry
        body = _unless_apart(cfg, body, lambda j: q_ids, lambda j: _ids_range(k_seg_ref, 0, bq, j * bk, bk), skip)
    free, hi = _k_ranges(cfg, i, nk)
    init = (jnp.zeros(q_qd.shape, jnp.float32), jnp.zeros((rows, 1), jnp.float32))
    dq_qd, db_q1 = _loop(0, free, hi, body, init)
    dq_ref[...] = (dq_qd * cfg.scale).astype(dq_ref.dtype)
    if db_ref is not None and full_k:
        def zero(j, c):  # causal-skipped blocks have zero gradient
            db_ref[:, pl.ds(j * bk, bk)] = jnp.zeros((rows, bk), db_ref.dtype)
            return c
        lax.fori_loop(hi, nk, zero, 0)
    elif db_ref is not None:
        db_ref[...] = db_q1.astype(db_ref.dtype)


# ----------------------------------------------------------------------------- calls

def _extras(cfg, bias, mask, rows, cols, idx):
    """Bias, mask and segment-id operands (where given) with their block specs; ``mask`` is
    (mask, query segment ids [B,1,Q,1], key segment ids [B,1,1,K])."""
    mask, q_seg, k_seg = mask
    pairs = [(x, _pair_spec(x.shape if shape is True else shape, rows, cols, idx))
             for x, shape in ((bias, cfg.bias_shape), (mask, cfg.mask_shape),
                              (q_seg, cfg.segments), (k_seg, cfg.segments)) if shape]
    return [x for x, _ in pairs], [spec for _, spec in pairs]


def _call(cfg, kernel, name, grid, in_specs, out_specs, out_shape, args, d, **static):
    return pl.pallas_call(
        functools.partial(kernel, cfg=cfg, n_in=len(args), **static), grid=grid, in_specs=in_specs,
        out_specs=out_specs, out_shape=out_shape, compiler_params=_params(cfg, len(grid), d),
        interpret=cfg.interpret, name=name)(*args)


def _forward(cfg, q, k, v, bias, mask):
    b, sq, h, d = q.shape
    sk, g = k.shape[1], cfg.groups
    if cfg.bhsd:
        h, sq, sk = q.shape[1], q.shape[2], k.shape[2]
    nq, nk = sq // cfg.block_q, sk // cfg.block_k
    qi = lambda b_, h_, i: (b_, h_, i)  # noqa: E731
    kv = _seq_spec(cfg, sk, d, lambda b_, h_, i: (b_, h_ // g, 0))
    extra, extra_specs = _extras(cfg, bias, mask, cfg.block_q, sk, lambda b_, h_, i: (b_, h_, i, 0))
    return _call(cfg, _fwd_kernel, "flash_fwd", (b, h, nq),
                 [_seq_spec(cfg, cfg.block_q, d, qi), kv, kv] + extra_specs,
                 [_seq_spec(cfg, cfg.block_q, d, qi), _stat_spec(cfg.block_q, qi)],
                 [jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct((b, h, sq, 1), jnp.float32)],
                 [q, k, v, *extra], d, nk=nk)


def _backward(cfg, q, k, v, bias, mask, o, lse, do, want_dbias):
    cfg = dataclasses.replace(cfg, block_q=cfg.bwd_blocks[0], block_k=cfg.bwd_blocks[1])
    bq, bk, g = cfg.block_q, cfg.block_k, cfg.groups
    b, sq, h, d = q.shape
    sk = k.shape[1]
    if cfg.bhsd:
        h, sq, sk = q.shape[1], q.shape[2], k.shape[2]
    nq, nk = sq // bq, sk // bk
    delta = jnp.sum(o.astype(jnp.float32) * do.astype(jnp.float32), axis=-1)
    delta = (delta if cfg.bhsd else delta.transpose(0, 2, 1))[..., None]  # [B,H,Q,1]
    base = [q, k, v, do, lse, delta]

    # dK/dV: one program per key block, per *query* head; groups summed afterwards.
    all_q = lambda b_, h_, j: (b_, h_, 0)  # noqa: E731
    kv_j = _seq_spec(cfg, bk, d, lambda b_, h_, j: (b_, h_ // g, j))
    extra, extra_specs = _extras(cfg, bias, mask, sq, bk, lambda b_, h_, j: (b_, h_, 0, j))
    dkv_shape = (b, h, sk, d) if cfg.bhsd else (b, sk, h, d)
    dk, dv = _call(cfg, _dkdv_kernel, "flash_dkdv", (b, h, nk),
                   [_seq_spec(cfg, sq, d, all_q), kv_j, kv_j, _seq_spec(cfg, sq, d, all_q),
                    _stat_spec(sq, all_q), _stat_spec(sq, all_q)] + extra_specs,
                   [_seq_spec(cfg, bk, d, lambda b_, h_, j: (b_, h_, j))] * 2,
                   [jax.ShapeDtypeStruct(dkv_shape, k.dtype if g == 1 else jnp.float32)] * 2,
                   base + extra, d, nq=nq)
    if g > 1:
        axis = 2 if cfg.bhsd else 3
        split = lambda x: x.reshape(*x.shape[:axis - 1], h // g, g, *x.shape[axis:])  # noqa: E731
        dk, dv = split(dk).sum(axis).astype(k.dtype), split(dv).sum(axis).astype(v.dtype)

    # dQ and the bias gradient: one program per query block.
    qi = lambda b_, h_, i: (b_, h_, i)  # noqa: E731
    kv_all = _seq_spec(cfg, sk, d, lambda b_, h_, i: (b_, h_ // g, 0))
    extra, extra_specs = _extras(cfg, bias, mask, bq, sk, lambda b_, h_, i: (b_, h_, i, 0))
    out_specs = [_seq_spec(cfg, bq, d, qi)]
    out_shape = [jax.ShapeDtypeStruct(q.shape, q.dtype)]
    if want_dbias:  # rows: bq, or 1 partial sum per query block; cols: all keys, or 1
        rows, cols = (bq if cfg.bias_shape[2] > 1 else 1), (sk if cfg.bias_shape[3] > 1 else 1)
        # [B, H, query block, rows, cols]: each program's block is a whole trailing [rows, cols]
        # (Mosaic takes a row of 1 only as a whole dim)
        out_specs.append(pl.BlockSpec((None, None, None, rows, cols), lambda b_, h_, i: (b_, h_, i, 0, 0)))
        out_shape.append(jax.ShapeDtypeStruct((b, h, nq, rows, cols), jnp.float32))
    outs = _call(cfg, _dq_kernel, "flash_dq", (b, h, nq),
                 [_seq_spec(cfg, bq, d, qi), kv_all, kv_all, _seq_spec(cfg, bq, d, qi),
                  _stat_spec(bq, qi), _stat_spec(bq, qi)] + extra_specs,
                 out_specs, out_shape, base + extra, d, nk=nk)
    dbias = None
    if want_dbias:  # sum over the dims the bias was broadcast over (and the query blocks)
        axes = tuple(a for a in range(4) if cfg.bias_shape[a] == 1)
        dbias = outs[1].reshape(b, h, nq * rows, cols).sum(axis=axes, keepdims=True).astype(bias.dtype)
    return outs[0], dk, dv, dbias


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _flash(q, k, v, bias, mask, cfg):
    return _forward(cfg, q, k, v, bias, mask)[0]


def _flash_fwd(q, k, v, bias, mask, cfg):
    # symbolic_zeros: each array comes wrapped with .perturbed, so a bias nobody
    # differentiates (ALiBi, say) costs no gradient buffer; the marker () asks for dbias.
    want_dbias = () if bias is not None and bias.perturbed else None
    q, k, v, bias = (None if x is None else x.value for x in (q, k, v, bias))
    mask = tuple(None if x is None else x.value for x in mask)  # (mask, query ids, key ids)
    o, lse = _forward(cfg, q, k, v, bias, mask)
    return o, (q, k, v, bias, mask, o, lse, want_dbias)


def _flash_bwd(cfg, res, do):
    q, k, v, bias, mask, o, lse, want_dbias = res
    if isinstance(do, jax.custom_derivatives.SymbolicZero):
        do = jnp.zeros(o.shape, o.dtype)
    dq, dk, dv, dbias = _backward(cfg, q, k, v, bias, mask, o, lse, do, want_dbias is not None)
    return dq, dk, dv, dbias, (None, None, None)


_flash.defvjp(_flash_fwd, _flash_bwd, symbolic_zeros=True)


# ----------------------------------------------------------------------------- public API

def check_flash(q, k, v, bias=None, mask=None):
    """Raise a ValueError naming the values when the inputs do not fit the kernel."""
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise ValueError(f"q, k, v must be [batch, seq, heads, head_dim]; got {q.shape}, {k.shape}, {v.shape}")
    if k.shape != v.shape or q.shape[0] != k.shape[0] or q.shape[3] != k.shape[3]:
        raise ValueError(f"shape mismatch: q {q.shape}, k {k.shape}, v {v.shape} "
                         "(need equal batch and head_dim, k and v alike)")
    if q.shape[2] % k.shape[2]:
        raise ValueError(f"kv_heads={k.shape[2]} does not divide heads={q.shape[2]}")
    if q.shape[3] > _MAX_HEAD_DIM:
        raise ValueError(f"head_dim={q.shape[3]} exceeds the flash kernel's limit of {_MAX_HEAD_DIM}")
    if not (q.dtype == k.dtype == v.dtype) or jnp.dtype(q.dtype) not in _DTYPES:
        raise ValueError(f"flash attention takes q, k, v of one dtype among float32, bfloat16, "
                         f"float16; got {q.dtype}, {k.dtype}, {v.dtype}")
    target = (q.shape[0], q.shape[2], q.shape[1], k.shape[1])
    for label, x in (("bias", bias), ("mask", mask)):
        if x is None:
            continue
        shape = (1,) * (4 - x.ndim) + tuple(x.shape)
        if x.ndim > 4 or any(n not in (1, t) for n, t in zip(shape, target)):
            raise ValueError(f"{label} of shape {tuple(x.shape)} does not broadcast to "
                             f"[batch, heads, q_len, kv_len] = {target}")
    if bias is not None and jnp.dtype(bias.dtype) not in _DTYPES:
        raise ValueError(f"bias dtype {bias.dtype} is not one of float32, bfloat16, float16")
    if mask is not None and jnp.dtype(mask.dtype) != jnp.dtype(bool):
        raise ValueError(f"mask must be boolean (True = attend); got {mask.dtype}")
    if jax.default_backend() in ("gpu", "cuda", "rocm") and not _triton_available():
        raise ValueError(f"the flash kernel on GPU needs Pallas's Triton backend, which jax "
                         f"{jax.__version__} does not have (deprecated since jax 0.11); use impl='sm90' "
                         f"(H100/H200), 'cudnn' or 'chunked'")


@functools.cache
def _triton_available() -> bool:
    """Whether this jax still has Pallas's Triton backend (deprecated in jax 0.11, to be removed)."""
    try:
        from jax.experimental.pallas import triton as pltriton
    except ImportError:
        return False
    return hasattr(pltriton, "CompilerParams")


def flash_supported(q, k, v, bias=None, mask=None) -> bool:
    """True when the compiled (GPU/TPU) kernel takes these inputs: layout, GQA, head_dim <= 256,
    one float32/bfloat16/float16 dtype, bias/mask broadcastable to [B,H,Q,K]."""
    try:
        check_flash(q, k, v, bias, mask)
    except ValueError:
        return False
    return True


def _next_pow2(n):
    return 1 << max(0, math.ceil(math.log2(max(n, 1))))


def flash_attention(q, k, v, *, bias=None, mask=None, causal=False, scale=None, segment_ids=None,
                    block_q=None, block_k=None, interpret=None, backend=None):
    """softmax(q k^T * scale + bias) v with the Pallas flash kernels.

    q [B,Q,H,D]; k, v [B,K,Hkv,D] with Hkv dividing H; bias (additive, differentiable) and
    mask (bool, True = attend) broadcastable to [B,H,Q,K]; ``causal`` aligns the last
    query with the last key; ``segment_ids`` (query ids [B,Q], key ids [B,K], integers): a
    query attends only to keys with its id (packed rows). Block sizes must be powers of two
    (>= 16 compiled, >= 8 interpreted); by default forward 128x64 and backward 64x64 (halved
    for head_dim > 128), clipped to the lengths.
    ``interpret=None`` interprets on CPU and compiles on GPU (Triton) or TPU (Mosaic);
    ``backend`` ("gpu" or "tpu") overrides ``jax.default_backend()``, e.g. to lower for
    another platform with ``jit(...).trace(...).lower(lowering_platforms=...)``.
    """
    check_flash(q, k, v, bias, mask)
    backend = jax.default_backend() if backend is None else backend
    if backend not in ("cpu", "gpu", "tpu"):
        raise ValueError(f"backend={backend!r} is not one of 'cpu', 'gpu', 'tpu'")
    interpret = backend not in ("gpu", "tpu") if interpret is None else bool(interpret)
    if not interpret and backend == "cpu":
        raise ValueError("interpret=False compiles the kernel for a GPU or TPU; the backend is 'cpu'")
    batch, q_len, heads, head_dim = q.shape
    kv_len, kv_heads = k.shape[1], k.shape[2]
    min_block = 8 if interpret else 16
    # Defaults (forward, backward) per head_dim; explicit block sizes apply to both passes. Mosaic
    # (compiled TPU) tiles a block's last dim by 128 lanes: key blocks of 128 there, so the key-wise
    # blocks of a bias, mask or key ids fit it.
    tpu = backend == "tpu" and not interpret
    defaults = (((128, 128),) * 2 if tpu else ((128, 64), (64, 64)) if head_dim <= 128
                else ((64, 32), (32, 32)))
    passes = []
    for default in defaults:
        pair = []
        for name, blk, dflt, n in (("block_q", block_q, default[0], q_len), ("block_k", block_k, default[1], kv_len)):
            blk = dflt if blk is None else blk
            least = 128 if tpu and name == "block_k" else min_block
            if blk < least or blk & (blk - 1):
                raise ValueError(f"{name}={blk} must be a power of two >= {least}"
                                 + (" on TPU (Mosaic's 128 lanes)" if least == 128 else ""))
            pair.append(min(blk, max(min_block, _next_pow2(n))))
        passes.append(tuple(pair))
    (bq, bk), bwd_blocks = passes
    qp = -(-q_len // max(bq, bwd_blocks[0])) * max(bq, bwd_blocks[0])
    kp = -(-kv_len // max(bk, bwd_blocks[1])) * max(bk, bwd_blocks[1])
    dp = max(16, _next_pow2(head_dim))
    scale = head_dim ** -0.5 if scale is None else float(scale)
    bhsd = backend == "tpu"  # Mosaic tiles the last two dims: keep [seq, head_dim] there

    def seq(x, n):  # pad sequence and head_dim; to the kernel layout
        x = jnp.pad(x, ((0, 0), (0, n - x.shape[1]), (0, 0), (0, dp - head_dim)))
        return x.transpose(0, 2, 1, 3) if bhsd else x

    def pair(x, fill):  # to 4-D; pad the q/k dims that are not broadcast
        x = x.reshape((1,) * (4 - x.ndim) + tuple(x.shape))
        pad_q = qp - q_len if x.shape[2] > 1 else 0
        pad_k = kp - kv_len if x.shape[3] > 1 else 0
        return jnp.pad(x, ((0, 0), (0, 0), (0, pad_q), (0, pad_k)), constant_values=fill)

    bias4 = None if bias is None else pair(bias, 0)
    mask4 = None if mask is None else pair(mask.astype(jnp.int8), 0)
    segs = (None, None)
    if segment_ids is not None:  # padded queries and keys match nothing
        q_ids, k_ids = segment_ids
        if tuple(q_ids.shape) != (batch, q_len) or tuple(k_ids.shape) != (batch, kv_len):
            raise ValueError(f"segment ids of shapes {tuple(q_ids.shape)}, {tuple(k_ids.shape)} must be "
                             f"[batch, q_len] = {(batch, q_len)} and [batch, kv_len] = {(batch, kv_len)}")
        q_ids = jnp.pad(jnp.asarray(q_ids, jnp.int32), ((0, 0), (0, qp - q_len)), constant_values=-1)
        k_ids = jnp.pad(jnp.asarray(k_ids, jnp.int32), ((0, 0), (0, kp - kv_len)), constant_values=-2)
        segs = (q_ids[:, None, :, None], k_ids[:, None, None, :])
    cfg = _Cfg(scale=scale, causal=bool(causal), q_len=q_len, kv_len=kv_len, block_q=bq,
               block_k=bk, bwd_blocks=bwd_blocks, groups=heads // kv_heads,
               bias_shape=None if bias4 is None else tuple(bias4.shape),
               mask_shape=None if mask4 is None else tuple(mask4.shape), segments=segment_ids is not None,
               bhsd=bhsd, interpret=interpret, backend=backend)
    out = _flash(seq(q, qp), seq(k, kp), seq(v, kp), bias4, (mask4, *segs), cfg)
    out = out.transpose(0, 2, 1, 3) if bhsd else out
    return out[:, :q_len, :, :head_dim]


def reference_attention(q, k, v, *, bias=None, mask=None, causal=False, scale=None):
    """Plain jnp attention in float32 (float64 under x64), same semantics as the kernel."""
    q_len, heads, head_dim = q.shape[1:]
    kv_len, kv_heads = k.shape[1], k.shape[2]
    acc = jnp.promote_types(q.dtype, jnp.float32)
    scale = head_dim ** -0.5 if scale is None else scale
    k = jnp.repeat(k, heads // kv_heads, axis=2).astype(acc)
    v = jnp.repeat(v, heads // kv_heads, axis=2).astype(acc)
    s_bhqk = jnp.einsum("bqhd,bkhd->bhqk", q.astype(acc), k) * scale
    if bias is not None:
        s_bhqk = s_bhqk + bias.astype(acc)
    valid = jnp.ones(s_bhqk.shape[-2:], bool) if mask is None else mask.astype(bool)
    if causal:
        valid = valid & jnp.tril(jnp.ones((q_len, kv_len), bool), k=kv_len - q_len)
    s_bhqk = jnp.where(valid, s_bhqk, -jnp.inf)
    m = jnp.max(s_bhqk, axis=-1, keepdims=True)
    p = jnp.exp(s_bhqk - jnp.where(jnp.isfinite(m), m, 0.0))
    l = jnp.sum(p, axis=-1, keepdims=True)
    p = p / jnp.where(l == 0, 1.0, l)
    return jnp.einsum("bhqk,bkhd->bqhd", p, v).astype(q.dtype)
