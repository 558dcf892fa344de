"""Hopper (sm90) flash attention behind the attention front door: ``impl="sm90"``.

The Pallas Mosaic GPU kernels in ``sciscale_jax.kernels.flash_attention_sm90``: the forward
(FlashAttention-3 layout: TMA ring, warp-specialised producer, two ping-ponging wgmma
consumers) saves the base-2 log-sum-exp of each row, and the backward runs the dK/dV, dQ and
(for a bias) dbias kernels from it, or the one fused kernel (``fused=True``); the bias gradient
comes back in the bias's shape.

Adaptations to the front-door contract: a boolean mask becomes a large negative additive term,
and rows with no key to attend are zeroed afterwards, as every implementation returns them. A
mask per key ([B or 1, 1, 1, K], as padding masks and the Evoformer's MSA and pair masks are)
enters the kernels as their ``key_bias``, one float per (batch row, key) read per key tile; any
other mask is added to the bias, at the bias's broadcast shape joined with the mask's.
``check_sm90`` refuses, before compilation, what the kernel cannot take: no sm90 GPU, dtypes
other than bfloat16/float16, head_dim other than 32/64/96/128, causal with q_len != kv_len.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from sciscale_jax.kernels.flash_attention_sm90 import check_sm90_inputs, flash_attention_sm90, sm90_supported
from sciscale_jax.kernels.flash_attention_sm90_bwd import flash_attention_sm90_bwd

_MASKED = -30000.0  # added to masked logits; finite in float16 too, so fully masked rows stay NaN-free


def check_sm90(q, k, v, bias=None, mask=None, causal=False) -> None:
    """Raise a ValueError naming the value when the sm90 kernel cannot take these inputs."""
    if not sm90_supported():
        raise ValueError(f"impl='sm90' needs a CUDA GPU of compute capability 9.x (H100/H200) and Pallas "
                         f"Mosaic GPU; jax's default backend is {jax.default_backend()!r}")
    check_sm90_inputs(q, k, v, bias, causal)
    if mask is not None:
        check_sm90_inputs(q, k, v, mask, causal)  # (a mask broadcasts as a bias does)


def _masked_as_bias(mask, dtype):
    return jnp.where(jnp.asarray(mask, bool), jnp.zeros((), dtype), jnp.asarray(_MASKED, dtype))


def _kernel_biases(bias, mask):
    """(bias for the kernel, key_bias for the kernel): a per-key mask becomes the key bias
    [B or 1, K or 1]; another mask joins the bias (float32)."""
    if mask is None:
        return bias, None
    mask4 = jnp.reshape(mask, (1,) * (4 - mask.ndim) + tuple(mask.shape))
    if mask4.shape[1] == 1 and mask4.shape[2] == 1:
        return bias, _masked_as_bias(mask4[:, 0, 0, :], jnp.float32)
    masked = _masked_as_bias(mask, jnp.float32)
    return (masked if bias is None else bias.astype(jnp.float32) + masked), None


def _sum_to(x, shape):
    """x summed over the axes where ``shape`` (right-aligned) broadcast to x's shape."""
    lead = x.ndim - len(shape)
    axes = tuple(range(lead)) + tuple(lead + i for i, n in enumerate(shape) if n == 1 and x.shape[lead + i] != 1)
    return jnp.sum(x, axis=axes, keepdims=True).reshape(shape) if axes else x.reshape(shape)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7, 8))
def _sm90(q, k, v, bias, mask, causal, scale, fused, persistent):
    kernel_bias, key_bias = _kernel_biases(bias, mask)
    return flash_attention_sm90(q, k, v, bias=kernel_bias, key_bias=key_bias, causal=causal, scale=scale,
                                persistent=persistent)


def _sm90_fwd(q, k, v, bias, mask, causal, scale, fused, persistent):
    kernel_bias, key_bias = _kernel_biases(bias, mask)
    out, lse2 = flash_attention_sm90(q, k, v, bias=kernel_bias, key_bias=key_bias, causal=causal, scale=scale,
                                     return_lse=True, persistent=persistent)
    return out, (q, k, v, bias, mask, out, lse2)


def _sm90_bwd(causal, scale, fused, persistent, residuals, dout_bqhd):
    """The sm90 backward kernels (dK/dV, dQ and, for a bias, dbias) from the saved log-sum-exp."""
    q, k, v, bias, mask, out, lse2 = residuals
    combined, key_bias = _kernel_biases(bias, mask)
    dq, dk, dv, dcombined = flash_attention_sm90_bwd(q, k, v, out, lse2, dout_bqhd.astype(q.dtype), bias=combined,
                                                     key_bias=key_bias, causal=causal, scale=scale,
                                                     bias_grad=bias is not None, fused=fused)
    dbias = None if bias is None else _sum_to(dcombined.astype(jnp.float32), bias.shape).astype(bias.dtype)
    return dq, dk, dv, dbias, None


_sm90.defvjp(_sm90_fwd, _sm90_bwd)


def sm90_attention(q_bqhd, k_bkhd, v_bkhd, *, bias=None, mask=None, causal=False, scale=None, fused=None,
                   persistent=None):
    """Front-door attention on the sm90 kernel. q [B,Q,H,D], k/v [B,K,Hkv,D]; bias/mask broadcast to [B,H,Q,K].
    ``fused`` picks the backward (``flash_attention_sm90_bwd``'s: None, the tuned or default one) and
    ``persistent`` the forward's grid (``flash_attention_sm90``'s)."""
    check_sm90(q_bqhd, k_bkhd, v_bkhd, bias, mask, causal)
    scale = q_bqhd.shape[-1] ** -0.5 if scale is None else float(scale)
    out_bqhd = _sm90(q_bqhd, k_bkhd, v_bkhd, bias, mask, bool(causal), scale, fused, persistent)
    if mask is not None:  # rows with no key to attend: zeros, as in every implementation
        target = (q_bqhd.shape[0], q_bqhd.shape[2], q_bqhd.shape[1], k_bkhd.shape[1])
        attended_bhq = jnp.any(jnp.broadcast_to(jnp.asarray(mask, bool), target), axis=-1)
        out_bqhd = jnp.where(attended_bhq.transpose(0, 2, 1)[..., None], out_bqhd, 0)
    return out_bqhd


IMPL = (sm90_attention, check_sm90)  # listed as impl="sm90" in sciscale_jax.attention.core.IMPLS
