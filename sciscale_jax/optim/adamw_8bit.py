"""8-bit AdamW with block-wise dynamic quantisation (Dettmers et al., ICLR 2022).

Both Adam moments are stored as uint8 codes shaped like the parameter: its last axis is cut
into blocks of up to ``block_size`` elements (``block_length``: a divisor of its length that
leaves whole blocks on each of up to 8 shards of it), each block keeps one float32 absmax,
and an element is stored as the index of the nearest entry of a 256-entry *dynamic*
quantisation map applied to x / absmax. Blocks along the last axis keep the parameter's
layout, so the codes shard as the parameter does (ZeRO, FSDP, tensor parallel) and the
update needs no resharding; blocks of the flattened array (the paper's, bitsandbytes') would
cut across the shards of any parameter not split on its first axis. The dynamic map
(Dettmers 2016) spends the leading bits on a decimal exponent and the rest on a linear
fraction, so it resolves values from ~1e-7 up to 1: decade 10^(k−6) (k = 0..6) holds 2^k
(signed map, both signs) or 2^(k+1) (unsigned map) evenly spaced fractions of [0.1, 1] (bin
midpoints), plus exact 0 and 1. The first moment uses the signed map, the second moment
(never negative) the unsigned one.

Each step dequantises, runs the AdamW update in float32 (bias correction, eps outside the
square root, decoupled weight decay) from the new float32 moments, and requantises those
moments for storage. Arrays with fewer than ``min_8bit_size`` elements, scalars, and arrays
whose last axis has no divisor between a quarter of ``block_size`` and ``block_size`` (a long
prime length) keep float32 moments. A block whose absmax is 0 stores zeros, so zero gradients
never divide by zero. A large array is updated about ``chunk_size`` elements at a time in a
loop over its first axis that rewrites its codes and its gradient buffer (which becomes the
update) in place, so the float32 moments exist one chunk at a time: updating the whole array
at once would hold them, and their scaled copies, for all of it
(``benchmarks/esm2_memory.py``). Each chunk takes every r-th index of the first axis (r
chunks), so a first axis split over devices stays split within every chunk. The chunks are
whole blocks: the result is the same bit for bit.

One deliberate change to nearest rounding: a *non-zero* second moment never rounds to the
code for 0; it takes the smallest positive code instead. Otherwise an element whose v is
below ~1.6e-7 of its block's absmax would dequantise to v = 0 while its first moment (own
block, signed map) stays non-zero, and m / (sqrt(0) + eps) explodes: the "zero-point
problem" of quantised second moments (Li et al., NeurIPS 2023, 4-bit optimizer states).
With the floor, m̂ / sqrt(v̂) stays bounded, including under long runs of zero gradients.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from sciscale_jax.optim import _checks


def dynamic_map(signed: bool) -> np.ndarray:
    """The 256 sorted float32 values of the dynamic quantisation map on [-1, 1] or [0, 1]."""
    values = [0.0, 1.0]
    for k in range(7):
        n = 2 ** k if signed else 2 ** (k + 1)
        edges = np.linspace(0.1, 1.0, n + 1)
        mids = (edges[:-1] + edges[1:]) / 2 * 10.0 ** (k - 6)
        values += list(mids) + (list(-mids) if signed else [])
    out = np.sort(np.asarray(values, np.float64)).astype(np.float32)
    assert out.size == 256, out.size
    return out


_SIGNED, _UNSIGNED = dynamic_map(True), dynamic_map(False)


class Quantized(NamedTuple):
    codes: jax.Array    # uint8, the parameter's shape
    absmax: jax.Array   # float32, the parameter's shape with its last axis counted in blocks


class AdamW8bitState(NamedTuple):
    count: jax.Array
    mu: Any   # per leaf: Quantized (signed map) or a float32 array
    nu: Any   # per leaf: Quantized (unsigned map) or a float32 array


def _guess_code(scaled: jax.Array, signed: bool) -> jax.Array:
    """The code whose bin holds ``scaled`` in the dynamic map, from its decade and fraction."""
    a = jnp.abs(scaled)
    k = jnp.clip(jnp.floor(jnp.log10(jnp.maximum(a, 1e-12))) + 7, 0, 6)   # decade [10^(k-7), 10^(k-6)]
    n = jnp.exp2(k) if signed else jnp.exp2(k + 1)                         # codes in that decade
    offset = n - 1 if signed else n - 2                                    # codes in the decades below
    j = jnp.clip(jnp.floor((a / 10.0 ** (k - 6) - 0.1) / (0.9 / n)), 0, n - 1)
    pos = offset + j
    if signed:   # sorted map: 127 negatives, 0 at 127, 127 positives, 1.0 at 255
        return jnp.where(scaled >= 0, 128 + pos, 126 - pos).astype(jnp.int32)
    return (1 + pos).astype(jnp.int32)   # 0 at 0, 254 positives, 1.0 at 255


def block_length(last: int, block_size: int) -> int:
    """Elements per block along a last axis of ``last``: its largest divisor up to ``block_size`` that
    leaves a number of blocks divisible by 8 (else 4, 2, 1) and is at least a quarter of
    ``block_size`` (or the whole axis), so a last axis split over up to 8 devices holds whole
    blocks on each (a block across two shards would make the update reshard the array)."""
    divisors = [d for d in range(min(last, block_size), 0, -1) if last % d == 0]
    for split in (8, 4, 2):
        fit = [d for d in divisors if (last // d) % split == 0 and (4 * d >= block_size or d == last)]
        if fit:
            return fit[0]
    return divisors[0]


def quantize(x: jax.Array, qmap: np.ndarray, block_size: int, nonzero_floor: bool = False) -> Quantized:
    """Block-wise nearest-code quantisation of ``x`` (at least 1-D) under ``qmap = dynamic_map(signed)``,
    blocks of ``block_length(x.shape[-1], block_size)`` along the last axis.

    The code is found elementwise: a guess from the map's exponent/fraction structure, then the
    exact nearest among the five codes around it (ties go to the lower code). Being
    elementwise, XLA fuses it: no searchsorted or table-sized temporaries.
    ``nonzero_floor``: non-zero elements of a non-negative ``x`` never take the code of 0
    (they take the next code up); see the module docstring.
    """
    b = block_length(x.shape[-1], block_size)
    q = _quantize_blocks(x.astype(jnp.float32).reshape(*x.shape[:-1], x.shape[-1] // b, b), qmap, nonzero_floor)
    return Quantized(q.codes.reshape(x.shape), q.absmax)


def _quantize_blocks(blocks: jax.Array, qmap: np.ndarray, nonzero_floor: bool = False) -> Quantized:
    """Codes [..., k, b] and absmax [..., k] of float32 ``blocks`` [..., k, b]."""
    signed = bool(qmap[0] < 0)
    absmax = jnp.max(jnp.abs(blocks), axis=-1)
    scaled = blocks / jnp.where(absmax > 0, absmax, 1.0)[..., None]
    table = jnp.asarray(qmap)
    guess = _guess_code(scaled, signed)
    codes = jnp.clip(guess - 2, 0, table.size - 1)
    err = jnp.abs(table[codes] - scaled)
    for d in (-1, 0, 1, 2):
        c = jnp.clip(guess + d, 0, table.size - 1)
        e = jnp.abs(table[c] - scaled)
        codes, err = jnp.where(e < err, c, codes), jnp.minimum(e, err)
    if nonzero_floor:
        zero = int(np.argmin(np.abs(qmap)))
        codes = jnp.where((blocks != 0) & (codes == zero), zero + 1, codes)
    return Quantized(codes.astype(jnp.uint8), absmax)


def dequantize(q: Quantized, qmap: np.ndarray, shape: tuple | None = None) -> jax.Array:
    """float32 values (the codes' shape) from a :class:`Quantized` array."""
    shape = q.codes.shape if shape is None else tuple(shape)
    if shape != q.codes.shape:
        raise ValueError(f"codes of shape {q.codes.shape} cannot give values of shape {shape}")
    k = q.absmax.shape[-1]
    codes = q.codes.reshape(*shape[:-1], k, shape[-1] // k)
    return _dequantize_blocks(codes, q.absmax, qmap).reshape(shape)


def _dequantize_blocks(codes: jax.Array, absmax: jax.Array, qmap: np.ndarray) -> jax.Array:
    return jnp.asarray(qmap)[codes.astype(jnp.int32)] * absmax[..., None]


def _rows_per_chunk(first: int, rest: int, chunk_size: int) -> int:
    """How many indices of the first axis (``first`` of them, ``rest`` elements each) a chunk takes:
    the largest divisor of ``first`` whose chunk has at most ``chunk_size`` elements (at least 1)."""
    return next(c for c in range(first, 0, -1) if first % c == 0 and (c * rest <= chunk_size or c == 1))


def adamw_8bit(learning_rate, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8,
               weight_decay: float = 0.0, block_size: int = 256,
               min_8bit_size: int = 4096, *, mask=None, chunk_size: int = 1 << 22) -> optax.GradientTransformation:
    """AdamW with uint8 block-wise quantised moments.

    Args:
      learning_rate: a finite positive number or a schedule of the step count.
      b1, b2, eps: Adam's moment decays and denominator offset (defaults 0.9, 0.999, 1e-8).
      weight_decay: decoupled decay coefficient; default 0 (no decay).
      block_size: elements per quantisation block (one float32 absmax each); default 256.
      min_8bit_size: arrays with fewer elements keep float32 moments; default 4096.
      mask: which parameters decay, as in ``optax.adamw``: a bool pytree (a prefix of params)
        or a function params -> bool pytree; ``None`` decays every parameter.
      chunk_size: elements of an array updated at a time (its float32 temporaries; at least one
        index of its first axis); default 2**22. The result does not depend on it.
    """
    learning_rate = _checks.learning_rate(learning_rate)
    b1, b2 = _checks.beta(b1, "b1"), _checks.beta(b2, "b2")
    eps = _checks.non_negative(eps, "eps")
    weight_decay = _checks.non_negative(weight_decay, "weight_decay")
    block_size = _checks.positive_int(block_size, "block_size")
    min_8bit_size = _checks.non_negative_int(min_8bit_size, "min_8bit_size")
    chunk_size = _checks.positive_int(chunk_size, "chunk_size")
    mask = _checks.decay_mask(mask)

    def small(p) -> bool:
        """Kept in float32: few elements, a scalar, or no block length near ``block_size``."""
        return (p.size < min_8bit_size or p.ndim == 0
                or 4 * block_length(p.shape[-1], block_size) < min(p.shape[-1], block_size))

    def init(params):
        def zeros(p, qmap):
            if small(p):
                return jnp.zeros(p.shape, jnp.float32)
            return quantize(jnp.zeros(p.shape, jnp.float32), qmap, block_size)
        return AdamW8bitState(jnp.zeros([], jnp.int32), jax.tree.map(lambda p: zeros(p, _SIGNED), params),
                              jax.tree.map(lambda p: zeros(p, _UNSIGNED), params))

    def update(updates, state, params=None):
        if weight_decay:
            _checks.need_params(params, "adamw_8bit(weight_decay > 0)")
        count = optax.safe_int32_increment(state.count)
        lr = _checks.lr_at(learning_rate, state.count)
        t = count.astype(jnp.float32)
        c1, c2 = 1 - b1 ** t, 1 - b2 ** t
        treedef = jax.tree.structure(updates)
        grads = treedef.flatten_up_to(updates)
        plist = treedef.flatten_up_to(params) if weight_decay else [None] * len(grads)
        decay = _checks.decay_flags(mask, params) if weight_decay else [False] * len(grads)
        def moments(g32, m32, v32, p):
            """(update, new m, new v) in float32 from the gradient and the old moments."""
            m32 = b1 * m32 + (1 - b1) * g32
            v32 = b2 * v32 + (1 - b2) * g32 * g32
            step = (m32 / c1) / (jnp.sqrt(v32 / c2) + eps)
            if p is not None:
                step = step + weight_decay * p.astype(jnp.float32)
            return -lr * step, m32, v32

        def leaf(g, m, v, p):
            """The update of one quantised leaf and its new moments, chunk by chunk (module doc)."""
            k = m.absmax.shape[-1]
            b = g.shape[-1] // k
            view = (*g.shape[:-1], k, b)  # the last axis in blocks: a reshape within every shard
            first, rest = view[0], int(np.prod(view[1:]))
            c = _rows_per_chunk(first, rest, chunk_size)
            r = first // c                # chunks: chunk j takes indices j, r + j, 2r + j, ... of the first axis
            strided = lambda x: x.reshape(c, r, *x.shape[1:])  # noqa: E731
            g_s, m_codes, v_codes = (strided(x.reshape(view)) for x in (g, m.codes, v.codes))
            m_max, v_max = strided(m.absmax.reshape(view[:-1])), strided(v.absmax.reshape(view[:-1]))
            p_s = None if p is None else strided(p.reshape(view))

            def chunk(j, carry):
                g_s, m_codes, m_max, v_codes, v_max = carry
                at = lambda x: jax.lax.dynamic_index_in_dim(x, j, axis=1, keepdims=False)  # noqa: E731
                m32 = _dequantize_blocks(at(m_codes), at(m_max), _SIGNED)
                v32 = _dequantize_blocks(at(v_codes), at(v_max), _UNSIGNED)
                step, m32, v32 = moments(at(g_s).astype(jnp.float32), m32, v32, None if p_s is None else at(p_s))
                qm, qv = _quantize_blocks(m32, _SIGNED), _quantize_blocks(v32, _UNSIGNED, nonzero_floor=True)
                put = lambda x, y: jax.lax.dynamic_update_index_in_dim(x, y.astype(x.dtype), j, axis=1)  # noqa: E731
                return (put(g_s, step), put(m_codes, qm.codes), put(m_max, qm.absmax), put(v_codes, qv.codes),
                        put(v_max, qv.absmax))

            carry = (g_s, m_codes, m_max, v_codes, v_max)
            if r == 1:
                carry = chunk(0, carry)
            else:
                carry = jax.lax.fori_loop(0, r, chunk, carry)
            g_s, m_codes, m_max, v_codes, v_max = carry
            return (g_s.reshape(g.shape), Quantized(m_codes.reshape(g.shape), m_max.reshape(m.absmax.shape)),
                    Quantized(v_codes.reshape(g.shape), v_max.reshape(v.absmax.shape)))

        steps, mus, nus = [], [], []
        for g, m, v, p, d in zip(grads, treedef.flatten_up_to(state.mu), treedef.flatten_up_to(state.nu), plist,
                                 decay):
            if isinstance(m, Quantized):
                step, m, v = leaf(g, m, v, p if d else None)
            else:
                step, m, v = moments(g.astype(jnp.float32), m, v, p if d else None)
            steps.append(step.astype(g.dtype))
            mus.append(m)
            nus.append(v)
        return treedef.unflatten(steps), AdamW8bitState(count, treedef.unflatten(mus), treedef.unflatten(nus))

    return optax.GradientTransformation(init, update)
