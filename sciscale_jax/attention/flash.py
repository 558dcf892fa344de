"""Pallas flash attention (FlashAttention-2, Dao 2023) behind the attention front door.

Listed as ``impl="flash"`` in ``sciscale_jax.attention.core.IMPLS`` (``IMPL`` below): the kernel in ``sciscale_jax.kernels.flash_attention`` (Triton on GPU, Mosaic on TPU,
interpreted on CPU), with ``check_flash`` refusing what it cannot take (head_dim > 256,
dtypes other than float32/bfloat16/float16) with a ValueError before compilation.
"""

from __future__ import annotations

from sciscale_jax.attention.core import Impl
from sciscale_jax.kernels.flash_attention import check_flash, flash_attention, flash_supported


def flash(q_bqhd, k_bkhd, v_bkhd, *, bias=None, mask=None, causal=False, scale=None, segment_ids=None):
    """Front-door signature over the kernel. q [B,Q,H,D], k/v [B,K,Hkv,D]; bias/mask to [B,H,Q,K];
    segment_ids (query ids [B,Q], key ids [B,K]) compared per tile."""
    return flash_attention(q_bqhd, k_bkhd, v_bkhd, bias=bias, mask=mask, causal=causal, scale=scale,
                           segment_ids=segment_ids)


IMPL = Impl(flash, check_flash, segments=True)

__all__ = ["IMPL", "check_flash", "flash", "flash_attention", "flash_supported"]
