"""cuDNN fused attention (NVIDIA's FlashAttention-style kernel) through ``jax.nn.dot_product_attention``.

A thin adapter from the front-door conventions to ``implementation="cudnn"``. What cuDNN
cannot take is refused with a ValueError before compilation (``check_cudnn``):
no CUDA GPU; a dtype other than float16/bfloat16; head_dim not a multiple of 8 or above
128 (256 on Hopper and later); an odd q_len or kv_len together with a bias, a mask or
non-square causal attention (cuDNN's bias gradient needs even lengths).

Adaptations: bias and mask are broadcast to full [.., q_len, kv_len] (cuDNN needs both
length dims; the broadcast's transpose sums the bias gradient back to the caller's shape);
causal attention with q_len != kv_len is passed as an explicit end-aligned mask, since
cuDNN's causal mask is start-aligned; rows with no key to attend are zeroed afterwards,
as the front door promises (cuDNN turns a mask into a large negative bias, which would
give such rows a uniform average).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

CUDNN_DTYPES = ("float16", "bfloat16")


def _gpu_compute_capability() -> float | None:
    """Compute capability of the first CUDA device ("9.0" -> 9.0), or None without one."""
    try:
        devices = jax.devices("gpu")
    except RuntimeError:
        return None
    try:  # ROCm devices report no numeric CUDA capability
        return float(getattr(devices[0], "compute_capability", None)) if devices else None
    except (TypeError, ValueError):
        return None


def check_cudnn(q, k, v, bias=None, mask=None, causal=False) -> None:
    """Raise a ValueError naming the value when cuDNN attention cannot take these inputs."""
    dtype = jnp.dtype(q.dtype).name
    if dtype not in CUDNN_DTYPES:
        raise ValueError(f"impl='cudnn' takes {' or '.join(CUDNN_DTYPES)} inputs; got {dtype}")
    head_dim, q_len, kv_len = q.shape[-1], q.shape[1], k.shape[1]
    capability = _gpu_compute_capability()
    if capability is None:
        raise ValueError(f"impl='cudnn' needs a CUDA GPU; jax's default backend is {jax.default_backend()!r}")
    max_head_dim = 256 if capability >= 9.0 else 128
    if head_dim % 8 or head_dim > max_head_dim:
        raise ValueError(f"impl='cudnn' needs head_dim a multiple of 8 and <= {max_head_dim}; got {head_dim}")
    needs_bias = bias is not None or mask is not None or (causal and q_len != kv_len)
    if needs_bias and (q_len % 2 or kv_len % 2):
        raise ValueError(f"impl='cudnn' with a bias or mask needs even lengths; got q_len={q_len}, kv_len={kv_len}")


def _full_length(x, q_len, kv_len):
    x = x.reshape((1,) * (4 - x.ndim) + tuple(x.shape))
    return jnp.broadcast_to(x, x.shape[:2] + (q_len, kv_len))


def cudnn_attention(q_bqhd, k_bkhd, v_bkhd, *, bias=None, mask=None, causal=False, scale=None):
    """Front-door attention on cuDNN. q [B,Q,H,D], k/v [B,K,Hkv,D]; bias/mask broadcast to [B,H,Q,K]."""
    check_cudnn(q_bqhd, k_bkhd, v_bkhd, bias, mask, causal)
    q_len, head_dim = q_bqhd.shape[1], q_bqhd.shape[-1]
    kv_len = k_bkhd.shape[1]
    scale = head_dim ** -0.5 if scale is None else float(scale)
    valid = None if mask is None else _full_length(jnp.asarray(mask, bool), q_len, kv_len)
    builtin_causal = causal and q_len == kv_len
    if causal and not builtin_causal:
        causal_qk = jnp.tril(jnp.ones((q_len, kv_len), bool), k=kv_len - q_len)
        valid = causal_qk[None, None] if valid is None else valid & causal_qk
    bias_4d = None if bias is None else _full_length(bias, q_len, kv_len).astype(q_bqhd.dtype)
    out_bqhd = jax.nn.dot_product_attention(q_bqhd, k_bkhd, v_bkhd, bias=bias_4d, mask=valid, scale=scale,
                                            is_causal=builtin_causal, implementation="cudnn")
    if valid is not None:  # rows with no key to attend: zeros, as in every implementation
        attended_bhq = jnp.any(valid, axis=-1)
        out_bqhd = jnp.where(attended_bhq.transpose(0, 2, 1)[..., None], out_bqhd, 0)
    return out_bqhd
