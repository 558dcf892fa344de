"""Ring Attention (Liu, Zaharia and Abbeel 2023, "Ring Attention with Blockwise Transformers
for Near-Infinite Context"), with zigzag load balancing for causal attention (as in
Brandon et al. 2023, "Striped Attention", and zigzag ring flash attention).

Inside ``jax.shard_map`` over the ``sequence`` axis each of P devices keeps its query block
and passes its key/value block around the ring with ``ppermute``; P steps of blockwise
attention with an online softmax (running max m, running sum l, unnormalised output o)
give the exact result while no device ever holds more than two key blocks. The backward
pass is a custom VJP: the same ring, recomputing each block's probabilities from the saved
log-sum-exp, with dK/dV accumulators (and dBias) travelling with their key block and one
final hop bringing them home.

Bias and mask are split along the key axis and travel with their keys; each device reads
the rows of its queries. Zigzag (causal only): the sequence is cut into 2P chunks and device
i holds chunks i and 2P-1-i, so every device has the same amount of unmasked work; a step
whose keys come from an earlier device needs only the first key chunk, one from a later
device only the second query chunk, and the step skips the masked half. The reordering
into and out of zigzag is two ``ppermute`` hops inside the shard_map, never a gather.

Registered with the attention front door as ``"ring"`` (zigzag on for causal attention).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from sciscale_jax.attention.xla import xla_attention
from sciscale_jax.parallel.mesh import axis_size
from sciscale_jax.parallel.ulysses import check_lengths_divide, qkv_spec_axes, sequence_degree


def zigzag_permutation(seq_len: int, degree: int) -> np.ndarray:
    """Index array putting chunks (i, 2P-1-i) next to each other for device i."""
    chunks = np.arange(seq_len).reshape(2 * degree, -1)
    return np.concatenate([np.concatenate([chunks[i], chunks[2 * degree - 1 - i]]) for i in range(degree)])


def _owner(chunk, degree):
    return chunk if chunk < degree else 2 * degree - 1 - chunk


def _zigzag_local(x, axis, degree, dim, inverse=False):
    """Inside shard_map: swap a contiguous block (chunks 2i, 2i+1) for the zigzag one
    (chunks i, 2P-1-i) with two ppermutes, or back; no device ever holds the whole sequence.

    Each device owns one even and one odd chunk; an even device keeps its even chunk first."""
    even_perm = [(i, _owner(2 * i, degree)) for i in range(degree)]
    odd_perm = [(i, _owner(2 * i + 1, degree)) for i in range(degree)]
    first, second = jnp.split(x, 2, axis=dim)
    is_even = jax.lax.axis_index(axis) % 2 == 0
    if not inverse:
        even = jax.lax.ppermute(first, axis, even_perm)
        odd = jax.lax.ppermute(second, axis, odd_perm)
        return jnp.where(is_even, jnp.concatenate([even, odd], dim), jnp.concatenate([odd, even], dim))
    even, odd = jnp.where(is_even, first, second), jnp.where(is_even, second, first)
    flip = lambda perm: [(b, a) for a, b in perm]
    return jnp.concatenate([jax.lax.ppermute(even, axis, flip(even_perm)),
                            jax.lax.ppermute(odd, axis, flip(odd_perm))], dim)


def _positions(device, block, degree, zigzag):
    """Global sequence positions of the block held by ``device``."""
    if not zigzag:
        return device * block + jnp.arange(block)
    half = block // 2
    return jnp.concatenate([device * half + jnp.arange(half), (2 * degree - 1 - device) * half + jnp.arange(half)])


def _rows(x, device, block):
    """The query rows of ``device`` from a [B, H, Q or 1, K] bias/mask block."""
    return x if x.shape[2] == 1 else jax.lax.dynamic_slice_in_dim(x, device * block, block, axis=2)


def _regions(causal, zigzag, block):
    """Static (query rows, key cols) slices per branch: 0 own block, 1 earlier device, 2 later."""
    full = (slice(None), slice(None))
    if not (causal and zigzag):
        return (full,)
    half = block // 2
    return (full, (slice(None), slice(0, half)), (slice(half, None), slice(None)))


def _branch(causal, zigzag, me, src):
    if not (causal and zigzag):
        return 0
    return jnp.where(src == me, 0, jnp.where(src < me, 1, 2))


def _logits(q, k, b, m, qpos, kpos, rows, cols, causal, scale):
    """Masked f32 logits [B, H, q, k] of a region; masked entries are -inf."""
    s = jnp.einsum("bqhd,bkhd->bhqk", q[:, rows], k[:, cols], preferred_element_type=jnp.float32) * scale
    crop = lambda x: x[:, :, rows if x.shape[2] > 1 else slice(None), cols if x.shape[3] > 1 else slice(None)]
    if b is not None:
        s = s + crop(b).astype(jnp.float32)
    valid = None if m is None else crop(m)
    if causal:
        c = qpos[rows][:, None] >= kpos[cols][None, :]
        valid = c if valid is None else valid & c
    return s if valid is None else jnp.where(valid, s, -jnp.inf)


def _sum_to(x, shape):
    """Sum the broadcast dims of ``x`` down to ``shape`` (same rank)."""
    axes = tuple(i for i, (a, b) in enumerate(zip(x.shape, shape)) if b == 1 and a != 1)
    return jnp.sum(x, axis=axes, keepdims=True)


def _ring_fwd_impl(axis, degree, causal, zigzag, scale, q, k, v, bias, mask):
    me = jax.lax.axis_index(axis)
    block = q.shape[1]
    qpos = _positions(me, block, degree, zigzag)
    perm = [(j, (j + 1) % degree) for j in range(degree)]
    bsz, _, heads, _ = q.shape
    o = jnp.zeros(q.shape, jnp.float32)
    m_run = jnp.full((bsz, heads, block), -jnp.inf, jnp.float32)
    l_run = jnp.zeros((bsz, heads, block), jnp.float32)

    def region_update(rows, cols, carry, k, v, b, mk, kpos):
        o, m_run, l_run = carry
        s = _logits(q, k, _rows(b, me, block) if b is not None else None,
                    _rows(mk, me, block) if mk is not None else None, qpos, kpos, rows, cols, causal, scale)
        m_old, l_old = m_run[:, :, rows], l_run[:, :, rows]
        m_new = jnp.maximum(m_old, s.max(-1))
        m_safe = jnp.where(jnp.isneginf(m_new), 0.0, m_new)
        p = jnp.exp(s - m_safe[..., None])
        corr = jnp.exp(m_old - m_safe)
        pv = jnp.einsum("bhqk,bkhd->bqhd", p, v[:, cols].astype(jnp.float32))
        o = o.at[:, rows].set(o[:, rows] * jnp.swapaxes(corr, 1, 2)[..., None] + pv)
        return o, m_run.at[:, :, rows].set(m_new), l_run.at[:, :, rows].set(l_old * corr + p.sum(-1))

    def step(s, carry):
        acc, k, v, b, mk = carry
        if s is not None:  # rotate first: after s hops this device holds the block of me - s
            k, v, b, mk = jax.lax.ppermute((k, v, b, mk), axis, perm)
        src = (me - (0 if s is None else s)) % degree
        kpos = _positions(src, block, degree, zigzag)
        fns = [functools.partial(region_update, r, c) for r, c in _regions(causal, zigzag, block)]
        acc = jax.lax.switch(_branch(causal, zigzag, me, src), fns, acc, k, v, b, mk, kpos)
        return acc, k, v, b, mk

    carry = step(None, ((o, m_run, l_run), k, v, bias, mask))
    (o, m_run, l_run), *_ = jax.lax.fori_loop(1, degree, step, carry)
    seen = l_run > 0
    out = o / jnp.where(seen, l_run, 1.0).swapaxes(1, 2)[..., None]
    lse = jnp.where(seen, jnp.where(jnp.isneginf(m_run), 0.0, m_run) + jnp.log(jnp.where(seen, l_run, 1.0)), jnp.inf)
    return out.astype(q.dtype), lse


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2, 3, 4, 5))
def _ring(axis, degree, causal, zigzag, scale, bias_axes, q, k, v, bias, mask):
    return _ring_fwd_impl(axis, degree, causal, zigzag, scale, q, k, v, bias, mask)[0]


def _ring_fwd(axis, degree, causal, zigzag, scale, bias_axes, q, k, v, bias, mask):
    out, lse = _ring_fwd_impl(axis, degree, causal, zigzag, scale, q, k, v, bias, mask)
    return out, (q, k, v, bias, mask, out, lse)


def _ring_bwd(axis, degree, causal, zigzag, scale, bias_axes, res, do):
    q, k, v, bias, mask, out, lse = res
    me = jax.lax.axis_index(axis)
    block = q.shape[1]
    qpos = _positions(me, block, degree, zigzag)
    perm = [(j, (j + 1) % degree) for j in range(degree)]
    do = do.astype(jnp.float32)
    delta = jnp.einsum("bqhd,bqhd->bhq", do, out.astype(jnp.float32))
    qf = q.astype(jnp.float32)
    zeros = lambda x: None if x is None else jnp.zeros(x.shape, jnp.float32)

    def region_grads(rows, cols, acc, k, v, b, mk, kpos):
        dq, dk, dv, db = acc
        s = _logits(q, k, _rows(b, me, block) if b is not None else None,
                    _rows(mk, me, block) if mk is not None else None, qpos, kpos, rows, cols, causal, scale)
        p = jnp.exp(s - lse[:, :, rows, None])
        do_r, k_c, v_c = do[:, rows], k[:, cols].astype(jnp.float32), v[:, cols].astype(jnp.float32)
        ds = p * (jnp.einsum("bqhd,bkhd->bhqk", do_r, v_c) - delta[:, :, rows, None])
        dq = dq.at[:, rows].add(jnp.einsum("bhqk,bkhd->bqhd", ds, k_c) * scale)
        dk = dk.at[:, cols].add(jnp.einsum("bhqk,bqhd->bkhd", ds, qf[:, rows]) * scale)
        dv = dv.at[:, cols].add(jnp.einsum("bhqk,bqhd->bkhd", p, do_r))
        if db is not None:  # this device's rows of the travelling dBias block
            q_rows = slice(None) if db.shape[2] == 1 else rows
            k_cols = slice(None) if db.shape[3] == 1 else cols
            mine = _rows(db, me, block)
            region = mine[:, :, q_rows, k_cols]
            mine = mine.at[:, :, q_rows, k_cols].add(_sum_to(ds, region.shape))
            db = mine if db.shape[2] == 1 else jax.lax.dynamic_update_slice_in_dim(db, mine, me * block, axis=2)
        return dq, dk, dv, db

    def step(s, carry):
        acc, k, v, b, mk = carry
        dq, dk, dv, db = acc
        if s is not None:  # k, v, bias, mask and their gradient accumulators move together
            k, v, b, mk, dk, dv, db = jax.lax.ppermute((k, v, b, mk, dk, dv, db), axis, perm)
        src = (me - (0 if s is None else s)) % degree
        kpos = _positions(src, block, degree, zigzag)
        fns = [functools.partial(region_grads, r, c) for r, c in _regions(causal, zigzag, block)]
        acc = jax.lax.switch(_branch(causal, zigzag, me, src), fns, (dq, dk, dv, db), k, v, b, mk, kpos)
        return acc, k, v, b, mk

    acc = (zeros(q), zeros(k), zeros(v), zeros(bias))
    carry = step(None, (acc, k, v, bias, mask))
    (dq, dk, dv, db), *_ = jax.lax.fori_loop(1, degree, step, carry)
    dk, dv, db = jax.lax.ppermute((dk, dv, db), axis, perm)  # the last hop home
    if db is not None and bias_axes:  # a bias shared across batch / head shards: sum their parts
        db = jax.lax.psum(db, bias_axes)
    cast = lambda g, x: None if x is None else g.astype(x.dtype)
    dmask = None if mask is None else np.zeros(mask.shape, jax.dtypes.float0)
    return cast(dq, q), cast(dk, k), cast(dv, v), cast(db, bias), dmask


_ring.defvjp(_ring_fwd, _ring_bwd)


def ring_attention(q_bshd, k_bshd, v_bshd, *, bias=None, mask=None, causal=False, scale=None,
                   mesh=None, axis="sequence", zigzag=None):
    """Exact attention with q, k, v split along the sequence over mesh ``axis`` and keys rotated.

    ``zigzag`` (default: on when causal) balances causal work; it needs seq % (2 x degree) == 0.
    """
    mesh, degree = sequence_degree(mesh, axis)
    if degree == 1:
        return xla_attention(q_bshd, k_bshd, v_bshd, bias=bias, mask=mask, causal=causal, scale=scale)
    batch, q_len, heads, head_dim = q_bshd.shape
    kv_len, kv_heads = k_bshd.shape[1], k_bshd.shape[2]
    zigzag = causal if zigzag is None else bool(zigzag)
    if causal and q_len != kv_len:
        raise ValueError(f"causal ring attention needs q_len == kv_len; got {q_len} and {kv_len}")
    if zigzag and q_len % (2 * degree):
        raise ValueError(f"seq_len={q_len} is not divisible by 2 x ring degree = 2 x {degree} = "
                         f"{2 * degree} (zigzag)")
    check_lengths_divide(q_len, kv_len, degree, "ring", axis)
    batch_axes, head_axis = qkv_spec_axes(mesh, batch, axis)
    if heads % axis_size(mesh, head_axis):
        head_axis = None
    if kv_heads != heads:  # grouped-query attention: the ring carries full heads
        k_bshd = jnp.repeat(k_bshd, heads // kv_heads, axis=2)
        v_bshd = jnp.repeat(v_bshd, heads // kv_heads, axis=2)
    scale = head_dim ** -0.5 if scale is None else float(scale)
    qkv_spec = P(batch_axes, axis, head_axis, None)

    perm = zigzag_permutation(q_len, degree) if zigzag else None

    def prepare(x):  # [B, H, Q, K] broadcastable; keys split over the ring, rows kept whole
        if x is None:
            return None, None
        x = x.reshape((1,) * (4 - x.ndim) + x.shape)
        x = jnp.broadcast_to(x, x.shape[:3] + (kv_len,))  # key blocks travel, so keys are explicit
        if perm is not None and x.shape[2] > 1:  # rows are not split: reorder them in place
            x = x[:, :, perm]
        return x, P(batch_axes if x.shape[0] > 1 else None, head_axis if x.shape[1] > 1 else None,
                     None, axis if x.shape[3] > 1 else None)

    (bias, bias_spec), (mask, mask_spec) = prepare(bias), prepare(None if mask is None else mask.astype(bool))
    shared = [a for a, s in ((batch_axes, bias_spec and bias_spec[0]), (head_axis, bias_spec and bias_spec[1]))
              if a and bias is not None and s is None]
    bias_axes = tuple(n for a in shared for n in ((a,) if isinstance(a, str) else a))
    ring = functools.partial(_ring, axis, degree, causal, zigzag, scale, bias_axes)

    def fn(q, k, v, b, mk):
        if not zigzag:
            return ring(q, k, v, b, mk)
        zz = functools.partial(_zigzag_local, axis=axis, degree=degree)
        q, k, v = (zz(x, dim=1) for x in (q, k, v))
        b, mk = (None if x is None else zz(x, dim=3) for x in (b, mk))
        return zz(ring(q, k, v, b, mk), dim=1, inverse=True)

    out = jax.shard_map(fn, mesh=mesh, in_specs=(qkv_spec, qkv_spec, qkv_spec, bias_spec, mask_spec),
                        out_specs=qkv_spec)(q_bshd, k_bshd, v_bshd, bias, mask)
    return out


IMPL = (ring_attention, None)  # listed as impl="ring" in sciscale_jax.attention.core.IMPLS
