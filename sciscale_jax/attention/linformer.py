"""Linformer: Wang et al. 2020, "Linformer: Self-Attention with Linear Complexity".

Keys and values are projected along the sequence by learned matrices E, F [proj_len,
max_len] before attention: softmax(q (E k)^T * scale) (F v), so the logits are
[q_len, proj_len] and time and memory grow linearly with sequence length. One projection
is shared by all heads; ``share_kv=True`` uses E for values too (the paper's key-value
sharing); passing one ``LinformerProjection`` to several layers shares it across layers
(the paper's layerwise sharing). Sequences shorter than ``max_len`` use the first kv_len
columns of E and F.

Padding masks are honoured: keys and values at masked positions are zeroed before the
projection, so padded content never reaches the output, and a batch element with no
key gives zeros. What it cannot honour, refused with a ValueError: causal attention (each
projected row mixes every position, future ones included), an additive bias over
[q_len, kv_len] and any mask that depends on the query or the head (both live in the
unprojected key space); kv_len above ``max_len``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from sciscale_jax.attention.core import check_dtypes, check_shapes
from sciscale_jax import axes as ax


def key_padding_mask(mask, batch: int, kv_len: int, method: str):
    """A [batch, kv_len] keep-mask from a mask broadcastable to [batch, 1, 1, kv_len], else ValueError."""
    if mask is None:
        return None
    shape = (1,) * (4 - mask.ndim) + tuple(mask.shape)
    if shape[1] != 1 or shape[2] != 1:
        raise ValueError(f"{method} honours key padding masks [batch, 1, 1, kv_len] only; got mask of shape "
                         f"{tuple(mask.shape)} (a per-head or per-query mask cannot be applied after "
                         f"the keys are summarised)")
    return jnp.broadcast_to(jnp.asarray(mask, bool).reshape(shape[0], shape[3]), (batch, kv_len))


class LinformerProjection(nnx.Module):
    """The learned sequence projections E (keys) and F (values), [proj_len, max_len]."""

    def __init__(self, max_len: int, proj_len: int, *, share_kv: bool = False, rngs: nnx.Rngs,
                 param_dtype=jnp.float32):
        for name, value in (("max_len", max_len), ("proj_len", proj_len)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}={value!r} must be a positive integer")
        self.max_len, self.proj_len, self.share_kv = max_len, proj_len, share_kv
        # N(0, 1/max_len): a projected row has the scale of one key.
        init = jax.nn.initializers.normal(stddev=max_len ** -0.5)

        def make():
            return nnx.Param(init(rngs.params(), (proj_len, max_len), param_dtype),
                             out_sharding=(None, ax.SEQ), eager_sharding=False)
        self.key_proj = make()
        self.value_proj = None if share_kv else make()

    def matrices(self, kv_len: int):
        """E and F restricted to the first kv_len positions: two [proj_len, kv_len] arrays."""
        e_pk = self.key_proj[...][:, :kv_len]
        f_pk = e_pk if self.value_proj is None else self.value_proj[...][:, :kv_len]
        return e_pk, f_pk


class LinformerAttention(nnx.Module):
    """Linformer attention with the front-door layout: q [B,Q,H,D], k/v [B,K,Hkv,D] -> [B,Q,H,D]."""

    def __init__(self, max_len: int, proj_len: int, *, share_kv: bool = False,
                 projection: LinformerProjection | None = None, rngs: nnx.Rngs, param_dtype=jnp.float32):
        if projection is not None and (projection.max_len, projection.proj_len) != (max_len, proj_len):
            raise ValueError(f"shared projection has max_len={projection.max_len}, proj_len={projection.proj_len}; "
                             f"this layer asks for max_len={max_len}, proj_len={proj_len}")
        self.projection = projection if projection is not None else LinformerProjection(
            max_len, proj_len, share_kv=share_kv, rngs=rngs, param_dtype=param_dtype)

    def __call__(self, q_bqhd, k_bkhd, v_bkhd, *, mask=None, bias=None, causal=False, scale=None):
        check_shapes(q_bqhd, k_bkhd, v_bkhd, bias, mask)
        check_dtypes(q_bqhd, k_bkhd, v_bkhd, bias, mask)
        if causal:
            raise ValueError("Linformer cannot honour causal=True: every projected key row mixes all "
                             "positions, future ones included")
        if bias is not None:
            raise ValueError(f"Linformer cannot honour an additive bias (got shape {tuple(bias.shape)}): "
                             f"it lives over the unprojected keys")
        batch, q_len, num_heads, head_dim = q_bqhd.shape
        kv_len, kv_heads = k_bkhd.shape[1], k_bkhd.shape[2]
        if kv_len > self.projection.max_len:
            raise ValueError(f"kv_len={kv_len} exceeds the Linformer projection's max_len={self.projection.max_len}")
        scale = head_dim ** -0.5 if scale is None else scale
        keep_bk = key_padding_mask(mask, batch, kv_len, "Linformer")
        if keep_bk is not None:  # padded keys and values contribute nothing to the projections
            k_bkhd = jnp.where(keep_bk[:, :, None, None], k_bkhd, 0)
            v_bkhd = jnp.where(keep_bk[:, :, None, None], v_bkhd, 0)
        e_pk, f_pk = self.projection.matrices(kv_len)
        k_bphd = jnp.einsum("pk,bkhd->bphd", e_pk.astype(k_bkhd.dtype), k_bkhd)
        v_bphd = jnp.einsum("pk,bkhd->bphd", f_pk.astype(v_bkhd.dtype), v_bkhd)
        if kv_heads != num_heads:
            k_bphd = jnp.repeat(k_bphd, num_heads // kv_heads, axis=2)
            v_bphd = jnp.repeat(v_bphd, num_heads // kv_heads, axis=2)
        logits_bhqp = jnp.einsum("bqhd,bphd->bhqp", q_bqhd, k_bphd, preferred_element_type=jnp.float32) * scale
        probs_bhqp = jax.nn.softmax(logits_bhqp, axis=-1).astype(v_bphd.dtype)
        out_bqhd = jnp.einsum("bhqp,bphd->bqhd", probs_bhqp, v_bphd)
        if keep_bk is not None:  # a batch element with no key attends to nothing
            out_bqhd = jnp.where(jnp.any(keep_bk, axis=-1)[:, None, None, None], out_bqhd, 0)
        return out_bqhd.astype(q_bqhd.dtype)
