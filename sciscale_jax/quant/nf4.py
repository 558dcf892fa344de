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
under bf16, 4.25 bits per weight at 64-element blocks; the paper's double quantisation of the
scales, 4.127 bits, is not done).

``float_target`` and ``store`` convert between a parameter tree holding ``kernel`` (float) and one
holding ``kernel_nf4`` + ``kernel_absmax``, so a float checkpoint is read into a 4-bit model.
"""

from __future__ import annotations

import statistics

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

CODES, SCALES, FLOAT = "kernel_nf4", "kernel_absmax", "kernel"  # the parameter names of a stored weight
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


def _stored_pairs(flat: dict) -> list[tuple]:
    """The key paths (without the leaf name) of the stored weights in a flattened tree."""
    return [p[:-1] for p in flat if p[-1] == CODES and p[:-1] + (SCALES,) in flat]


def float_target(tree: dict) -> dict:
    """``tree`` (of arrays or ShapeDtypeStructs) with each stored weight's ``kernel_nf4`` +
    ``kernel_absmax`` replaced by a ShapeDtypeStruct ``kernel`` of its full shape, in the scales'
    dtype, sharded as the codes are: what a float checkpoint is read onto."""
    flat = traverse_util.flatten_dict(tree, keep_empty_nodes=True)
    for at in _stored_pairs(flat):
        codes, scales = flat.pop(at + (CODES,)), flat.pop(at + (SCALES,))
        shape = (*codes.shape[:-1], 2 * codes.shape[-1])
        flat[at + (FLOAT,)] = jax.ShapeDtypeStruct(shape, scales.dtype, sharding=getattr(codes, "sharding", None))
    return traverse_util.unflatten_dict(flat)


def store(params: dict, like: dict) -> dict:
    """``params`` with each float ``kernel`` stored in 4 bits where ``like`` (the model's own
    parameters) holds ``kernel_nf4`` + ``kernel_absmax`` at its place; the scales take the dtype
    of ``like``'s."""
    flat = traverse_util.flatten_dict(params, keep_empty_nodes=True)
    want = traverse_util.flatten_dict(like, keep_empty_nodes=True)
    for at in _stored_pairs(want):
        if at + (FLOAT,) in flat:
            n = 2 * want[at + (CODES,)].shape[-1]
            codes, scales = quantize(flat.pop(at + (FLOAT,)), n // want[at + (SCALES,)].shape[-1])
            flat[at + (CODES,)], flat[at + (SCALES,)] = codes, scales.astype(want[at + (SCALES,)].dtype)
    return traverse_util.unflatten_dict(flat)
