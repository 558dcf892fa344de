"""A float64 numpy NF4 quantiser written from the QLoRA paper (Dettmers et al. 2023, section 3 and
appendix E), independent of ``sciscale_jax.quant.nf4``: block-wise absmax scaling and the nearest of
the paper's 16 published NormalFloat levels, by brute force."""

import numpy as np

# The NF4 levels as the paper's appendix (and bitsandbytes) print them.
PAPER_NF4 = np.array([-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
                      -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
                      0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
                      0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0])


def quantize(w, block: int):
    """(level indices [..., n], absmax [..., n // block], w / absmax [..., n]) of ``w`` in float64."""
    w = np.asarray(w, np.float64)
    blocks = w.reshape(*w.shape[:-1], w.shape[-1] // block, block)
    absmax = np.abs(blocks).max(-1)
    scaled = blocks / np.where(absmax > 0, absmax, 1.0)[..., None]
    codes = np.abs(scaled[..., None] - PAPER_NF4).argmin(-1)
    return codes.reshape(w.shape), absmax, scaled.reshape(w.shape)


def dequantize(codes, absmax):
    """The float64 weight of level indices [..., n] and absmax [..., n // block]."""
    block = codes.shape[-1] // absmax.shape[-1]
    return PAPER_NF4[codes] * np.repeat(np.asarray(absmax, np.float64), block, axis=-1)


def unpack(packed):
    """Level indices [..., 2 m] from bytes [..., m] holding two each (the even element's in the low half)."""
    packed = np.asarray(packed, np.uint8)
    return np.stack([packed & 15, packed >> 4], axis=-1).reshape(*packed.shape[:-1], 2 * packed.shape[-1])


def round_trip(w, block: int):
    """``w`` quantised and dequantised (float64)."""
    codes, absmax, _ = quantize(w, block)
    return dequantize(codes, absmax)


def near_a_midpoint(scaled, tol: float = 1e-6):
    """Where w / absmax lies within ``tol`` of the middle between two levels (a tie float32 may break
    either way)."""
    mids = (PAPER_NF4[1:] + PAPER_NF4[:-1]) / 2
    return np.abs(np.asarray(scaled)[..., None] - mids).min(-1) < tol


def double_quantize(absmax):
    """(int codes, mean, step) of positive scales [..., m], per row in float64: the distance from
    the row's mean in steps of the row's largest distance / 127, rounded to the nearest step."""
    a = np.asarray(absmax, np.float64)
    mean = a.mean(-1, keepdims=True)
    step = np.abs(a - mean).max(-1, keepdims=True) / 127
    return np.round((a - mean) / np.where(step > 0, step, 1.0)), mean, step


def double_dequantize(codes, rows):
    """The scales [..., m] that int codes [..., m] and rows [..., 2] (mean, step) stand for (float64)."""
    rows = np.asarray(rows, np.float64)
    return np.asarray(codes, np.float64) * rows[..., 1:] + rows[..., :1]
