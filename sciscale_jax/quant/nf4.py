"""4-bit NormalFloat storage of frozen weights (QLoRA: Dettmers et al., NeurIPS 2023).

A frozen weight (LoRA's base) needs no gradient and no master copy, so it can be stored in 4
bits and dequantised to the compute dtype as its layer runs. NormalFloat-k places its 2**k
levels at quantiles of N(0, 1) scaled to [-1, 1], with an exact zero: 2**(k-1) positive levels,
2**(k-1) - 1 negative ones (``normal_float_levels``; k = 4 gives the paper's NF4 table). A weight
is cut into blocks along its last axis, each block keeps its absmax, and each element stores the
index of the level nearest to element / absmax, two 4-bit indices per byte.

Blocks are up to 64 elements (the paper's) along the last axis; where that axis may be split over
devices, their length also leaves whole blocks on each of up to 8 shards (``block_length``): the
codes and scales keep the weight's logical axes and shard as it would. The scales are stored in
the dtype they are given (a LoRA run stores its frozen weights in the compute dtype: bf16 scales
under bf16, 4.25 bits per weight at 64-element blocks).

Double quantisation (the paper's, ``double_quantize``) stores the scales themselves in 8 bits:
each row of scales (one weight row's blocks) keeps its mean and an int8 code per scale of the
scale's distance from that mean, in steps of the row's largest distance / 127; the row's mean
and step are stored in the scales' dtype (``kernel_absmax_q`` int8 + ``kernel_absmax_dq`` [..., 2]).
At 64-element blocks that is 4 + 8/64 + 2 x 16/n bits per weight under bf16 (n: the row's
length; 4.131 at 5,120) against 4.25. A row of few blocks would pay more for its mean and step
than it saves (a query kernel's rows end in one head's 64 or 128 channels): rows of fewer than
``DOUBLE_MIN_BLOCKS`` blocks keep plain scales. The paper quantises all scales to 8-bit floats
in blocks of 256 instead of integers per row (rows keep the weight's sharding).

``float_target`` and ``store`` convert between a parameter tree holding ``kernel`` (float) and one
holding ``kernel_nf4`` + ``kernel_absmax`` (or its two double-quantised arrays), so a float
checkpoint is read into a 4-bit model; ``pop_float`` dequantises a stored weight of a tree.
"""

from __future__ import annotations

import statistics

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

CODES, SCALES, FLOAT = "kernel_nf4", "kernel_absmax", "kernel"  # the parameter names of a stored weight
SCALE_CODES, SCALE_ROWS = "kernel_absmax_q", "kernel_absmax_dq"  # its scales, double-quantised
DOUBLE_MIN_BLOCKS = 8  # double quantisation where a row has this many blocks (8 + 32/8 bits < 16 per scale)
BLOCK = 64


def normal_float_levels(bits: int = 4) -> np.ndarray:
    """The 2**bits NormalFloat levels in [-1, 1], ascending (float64): quantiles of N(0, 1) at equal
    steps from 1 - delta to 1/2 on each side (delta halfway between 1/(2n) and 1/(2(n-1)) of the
    n = 2**bits levels, so the outermost quantile stays finite), each side normalised to end at 1,
    with 0 between them."""
    if not isinstance(bits, int) or isinstance(bits, bool) or not 2 <= bits <= 8:
        raise ValueError(f"bits={bits!r} must be an int in [2, 8]")
    n = 2 ** bits
    top = 1 - 0.5 * (1 / (2 * n) + 1 / (2 * (n - 1)))
    inv = statistics.NormalDist().inv_cdf
    positive = [inv(p) for p in np.linspace(top, 0.5, n // 2 + 1)[:-1]]
    negative = [-inv(p) for p in np.linspace(top, 0.5, n // 2)[:-1]]
    levels = np.array(sorted(positive + [0.0] + negative))
    return levels / np.max(np.abs(levels))


NF4 = normal_float_levels(4)


def block_length(last: int, split: bool = True, block: int = BLOCK) -> int:
    """Elements per block along a last axis of ``last`` (even, so two codes share a byte): its
    largest even divisor up to ``block``; for an axis that may be ``split`` over devices, the
    largest that also leaves a number of blocks divisible by 8 (else 4, 2, 1) and is at least a
    quarter of ``block`` or the whole axis."""
    if last % 2:
        raise ValueError(f"a 4-bit weight needs an even last axis, got {last}")
    divisors = [d for d in range(min(last, block), 1, -1) if last % d == 0 and d % 2 == 0]
    for split in (8, 4, 2) if split else ():
        fit = [d for d in divisors if (last // d) % split == 0 and (4 * d >= block or d == last)]
        if fit:
            return fit[0]
    return divisors[0]


def quantize(w: jax.Array, block: int | None = None, levels: np.ndarray = NF4) -> tuple[jax.Array, jax.Array]:
    """``(codes, absmax)`` of ``w`` [..., n] in blocks of ``block`` (default ``block_length(n)``)
    elements: uint8 codes [..., n // 2] (two level indices per byte, the even element's in the low
    half) and float32 absmax [..., n // block]."""
    if len(levels) > 16:
        raise ValueError(f"{len(levels)} levels do not fit in 4 bits")
    n = w.shape[-1]
    b = block_length(n) if block is None else block
    if b % 2 or n % b:
        raise ValueError(f"block {b} must be even and divide the last axis ({n})")
    blocks = w.astype(jnp.float32).reshape(*w.shape[:-1], n // b, b)
    absmax = jnp.max(jnp.abs(blocks), axis=-1)
    scaled = blocks / jnp.where(absmax > 0, absmax, 1.0)[..., None]
    mids = jnp.asarray((levels[1:] + levels[:-1]) / 2, jnp.float32)
    index = jnp.searchsorted(mids, scaled).astype(jnp.uint8).reshape(*w.shape[:-1], n // 2, 2)
    return index[..., 0] | (index[..., 1] << 4), absmax


def dequantize(codes: jax.Array, absmax: jax.Array, dtype=jnp.float32, levels: np.ndarray = NF4) -> jax.Array:
    """The weight [..., 2 * codes.shape[-1]] in ``dtype`` that ``codes`` and ``absmax`` store."""
    n = 2 * codes.shape[-1]
    index = jnp.stack([codes & 15, codes >> 4], axis=-1).reshape(*codes.shape[:-1], absmax.shape[-1], -1)
    values = jnp.asarray(levels, jnp.float32)[index] * absmax.astype(jnp.float32)[..., None]
    return values.reshape(*codes.shape[:-1], n).astype(dtype)


def double_quantize(absmax: jax.Array, dtype=jnp.float32) -> tuple[jax.Array, jax.Array]:
    """``(codes, rows)`` of positive scales ``absmax`` [..., m]: int8 codes [..., m] of each scale's
    distance from its row's mean in steps of the row's largest distance / 127, and ``rows``
    [..., 2] (the mean, the step) in ``dtype``; the scales come back as
    ``codes * step + mean`` (:func:`double_dequantize`, with the stored mean and step)."""
    a = absmax.astype(jnp.float32)
    low = jnp.min(a, axis=-1, keepdims=True)  # (a row of equal scales then has its mean exactly: no spread)
    mean = (low + jnp.mean(a - low, axis=-1, keepdims=True)).astype(dtype).astype(jnp.float32)
    step = (jnp.max(jnp.abs(a - mean), axis=-1, keepdims=True) / 127).astype(dtype).astype(jnp.float32)
    codes = jnp.clip(jnp.round((a - mean) / jnp.where(step > 0, step, 1.0)), -127, 127).astype(jnp.int8)
    return codes, jnp.concatenate([mean, step], axis=-1).astype(dtype)


def double_dequantize(codes: jax.Array, rows: jax.Array) -> jax.Array:
    """The scales [..., m] (float32) that :func:`double_quantize`'s ``codes`` and ``rows`` store."""
    rows = rows.astype(jnp.float32)
    return codes.astype(jnp.float32) * rows[..., 1:] + rows[..., :1]


def _stored(flat: dict) -> list[tuple]:
    """The key paths (without the leaf name) of the stored weights in a flattened tree."""
    return [p[:-1] for p in flat if p[-1] == CODES and (p[:-1] + (SCALES,) in flat or p[:-1] + (SCALE_CODES,) in flat)]


def _scale_dtype(flat: dict, at: tuple):
    return flat[at + (SCALES,)].dtype if at + (SCALES,) in flat else flat[at + (SCALE_ROWS,)].dtype


def pop_float(flat: dict, at: tuple, dtype=jnp.float32) -> jax.Array:
    """The weight stored at ``at`` of a flattened tree, dequantised (its codes and scales popped)."""
    if at + (SCALES,) in flat:
        absmax = flat.pop(at + (SCALES,))
    else:
        absmax = double_dequantize(flat.pop(at + (SCALE_CODES,)), flat.pop(at + (SCALE_ROWS,)))
    return dequantize(flat.pop(at + (CODES,)), absmax, dtype)


def float_target(tree: dict) -> dict:
    """``tree`` (of arrays or ShapeDtypeStructs) with each stored weight's codes and scales
    replaced by a ShapeDtypeStruct ``kernel`` of its full shape, in the scales' dtype, sharded as
    the codes are: what a float checkpoint is read onto."""
    flat = traverse_util.flatten_dict(tree, keep_empty_nodes=True)
    for at in _stored(flat):
        dtype = _scale_dtype(flat, at)
        codes = flat.pop(at + (CODES,))
        for name in (SCALES, SCALE_CODES, SCALE_ROWS):
            flat.pop(at + (name,), None)
        shape = (*codes.shape[:-1], 2 * codes.shape[-1])
        flat[at + (FLOAT,)] = jax.ShapeDtypeStruct(shape, dtype, sharding=getattr(codes, "sharding", None))
    return traverse_util.unflatten_dict(flat)


def store(params: dict, like: dict) -> dict:
    """``params`` with each float ``kernel`` stored in 4 bits where ``like`` (the model's own
    parameters) holds a stored weight at its place, as ``like`` stores it (plain or
    double-quantised scales, in the dtype of ``like``'s)."""
    flat = traverse_util.flatten_dict(params, keep_empty_nodes=True)
    want = traverse_util.flatten_dict(like, keep_empty_nodes=True)
    for at in _stored(want):
        if at + (FLOAT,) in flat:
            n, dtype = 2 * want[at + (CODES,)].shape[-1], _scale_dtype(want, at)
            blocks = want[at + (SCALES,) if at + (SCALES,) in want else at + (SCALE_CODES,)].shape[-1]
            codes, scales = quantize(flat.pop(at + (FLOAT,)), n // blocks)
            flat[at + (CODES,)] = codes
            if at + (SCALES,) in want:
                flat[at + (SCALES,)] = scales.astype(dtype)
            else:
                flat[at + (SCALE_CODES,)], flat[at + (SCALE_ROWS,)] = double_quantize(scales, dtype)
    return traverse_util.unflatten_dict(flat)
