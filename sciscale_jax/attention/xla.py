"""Plain XLA scaled dot-product attention: the reference every other implementation matches.

Materialises the [batch, heads, q_len, kv_len] logits, so memory grows quadratically with
sequence length. A ``jax.custom_vjp`` keeps what the backward pass needs and nothing more:
q, k, v and one float32 probability tensor per call (tagged ``attn_probs``, so remat policies
can save, offload or recompute it). The backward pass is the softmax-attention gradient
written out: dV = P^T dO, dP = dO V^T, dS = P * (dP - rowsum(P * dP)), dQ = dS K, dK = dS^T Q;
the bias gradient is dS summed over the bias's broadcast dimensions, in the bias's own shape.

The mask and the causal triangle are applied once, as -inf on the logits; the softmax
subtracts a row maximum that is 0 for a row with no finite logit, so a row with no key to
attend gives zeros (not NaN, not a uniform average) and zero gradients. Grouped-query
attention reshapes the query heads into [kv_heads, group] instead of repeating k and v.
Softmax and the gradients run in float32 (float64 for float64 inputs).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from sciscale_jax import remat


class _Spec(NamedTuple):
    """Static facts the custom VJP closes over (hashable)."""
    scale: float
    group: int          # query heads per kv head
    bias_shape: tuple | None   # None when there is no bias
    bias_dtype: str
    varying: tuple      # per input (q, k, v, bias): the shard_map axes it varies over


def xla_attention(q_bqhd, k_bkhd, v_bkhd, *, bias=None, mask=None, causal=False, scale=None):
    """Reference attention. Shapes: q [B,Q,H,D], k/v [B,K,Hkv,D]; bias/mask broadcast to [B,H,Q,K]."""
    *_, q_len, num_heads, head_dim = q_bqhd.shape
    kv_len, kv_heads = k_bkhd.shape[1], k_bkhd.shape[2]
    scale = head_dim ** -0.5 if scale is None else float(scale)
    valid = _combined_mask(mask, causal, q_len, kv_len)
    spec = _Spec(scale, num_heads // kv_heads, None if bias is None else tuple(bias.shape),
                 "" if bias is None else jnp.dtype(bias.dtype).name,
                 tuple(_varying(x) for x in (q_bqhd, k_bkhd, v_bkhd, bias)))
    return _attention(spec, q_bqhd, k_bkhd, v_bkhd, bias, valid)


def _combined_mask(mask, causal, q_len, kv_len):
    """Boolean [.., Q, K] mask (True = attend) from a user mask and the causal flag, or None."""
    valid = None if mask is None else mask.astype(bool)
    if causal:
        # Query i sees keys j <= i + (kv_len - q_len): aligned at the end, as in decoding.
        causal_qk = jnp.tril(jnp.ones((q_len, kv_len), bool), k=kv_len - q_len)
        valid = causal_qk if valid is None else valid & causal_qk
    return valid


def _acc_dtype(dtype):
    """float32 for half and single precision inputs, float64 for float64."""
    return jnp.promote_types(dtype, jnp.float32)


def _grouped(x_bqhd, group):
    """[B, Q, H, D] -> [B, Q, Hkv, G, D]: query head h belongs to kv head h // G."""
    b, q, h, d = x_bqhd.shape
    return x_bqhd.reshape(b, q, h // group, group, d)


def _probs(spec: _Spec, q_bqhd, k_bkhd, bias, valid):
    """Softmax probabilities [B, H, Q, K] in the accumulation dtype; masked entries exactly 0."""
    acc = _acc_dtype(q_bqhd.dtype)
    b, q_len, h, _ = q_bqhd.shape
    logits_bhgqk = jnp.einsum("bqhgd,bkhd->bhgqk", _grouped(q_bqhd, spec.group), k_bkhd,
                              preferred_element_type=acc)
    logits_bhqk = logits_bhgqk.reshape(b, h, q_len, k_bkhd.shape[1]) * jnp.asarray(spec.scale, acc)
    if bias is not None:
        logits_bhqk = logits_bhqk + bias.astype(acc)
    logits_bhqk = checkpoint_name(logits_bhqk, remat.ATTN_LOGITS)
    if valid is not None:
        logits_bhqk = jnp.where(valid, logits_bhqk, -jnp.inf)
    row_max = jnp.max(logits_bhqk, axis=-1, keepdims=True)
    row_max = jnp.where(jnp.isfinite(row_max), row_max, 0.0)  # a row with nothing to attend
    e_bhqk = jnp.exp(logits_bhqk - jax.lax.stop_gradient(row_max))
    total = jnp.sum(e_bhqk, axis=-1, keepdims=True)
    return e_bhqk / jnp.where(total > 0, total, 1.0)


def _context(spec: _Spec, probs_bhqk, v_bkhd):
    """probs @ v: [B, Q, H, D] in v's dtype."""
    b, h, q_len, kv_len = probs_bhqk.shape
    probs_bhgqk = probs_bhqk.astype(v_bkhd.dtype).reshape(b, h // spec.group, spec.group, q_len, kv_len)
    out_bqhgd = jnp.einsum("bhgqk,bkhd->bqhgd", probs_bhgqk, v_bkhd,
                           preferred_element_type=_acc_dtype(v_bkhd.dtype))
    return out_bqhgd.reshape(b, q_len, h, -1).astype(v_bkhd.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _attention(spec: _Spec, q_bqhd, k_bkhd, v_bkhd, bias, valid):
    probs_bhqk = checkpoint_name(_probs(spec, q_bqhd, k_bkhd, bias, valid), remat.ATTN_PROBS)
    return _context(spec, probs_bhqk, v_bkhd).astype(q_bqhd.dtype)


def _attention_fwd(spec: _Spec, q_bqhd, k_bkhd, v_bkhd, bias, valid):
    probs_bhqk = checkpoint_name(_probs(spec, q_bqhd, k_bkhd, bias, valid), remat.ATTN_PROBS)
    out_bqhd = _context(spec, probs_bhqk, v_bkhd).astype(q_bqhd.dtype)
    return out_bqhd, (q_bqhd, k_bkhd, v_bkhd, probs_bhqk)


def _attention_bwd(spec: _Spec, res, g_bqhd):
    q_bqhd, k_bkhd, v_bkhd, probs_bhqk = res
    acc = probs_bhqk.dtype
    b, h, q_len, kv_len = probs_bhqk.shape
    kv_heads, group = h // spec.group, spec.group
    probs_bhgqk = probs_bhqk.reshape(b, kv_heads, group, q_len, kv_len)
    g_bqhgd = _grouped(g_bqhd.astype(v_bkhd.dtype), group)
    dv_bkhd = jnp.einsum("bhgqk,bqhgd->bkhd", probs_bhgqk.astype(v_bkhd.dtype), g_bqhgd,
                         preferred_element_type=acc).astype(v_bkhd.dtype)
    dp_bhgqk = jnp.einsum("bqhgd,bkhd->bhgqk", g_bqhgd, v_bkhd, preferred_element_type=acc)
    ds_bhgqk = probs_bhgqk * (dp_bhgqk - jnp.sum(probs_bhgqk * dp_bhgqk, axis=-1, keepdims=True))
    scale = jnp.asarray(spec.scale, acc)
    ds_q = ds_bhgqk.astype(q_bqhd.dtype)
    dq_bqhd = (jnp.einsum("bhgqk,bkhd->bqhgd", ds_q, k_bkhd, preferred_element_type=acc) * scale
               ).reshape(q_bqhd.shape).astype(q_bqhd.dtype)
    dk_bkhd = (jnp.einsum("bhgqk,bqhgd->bkhd", ds_q, _grouped(q_bqhd, group), preferred_element_type=acc)
               * scale).astype(k_bkhd.dtype)
    dbias = None
    if spec.bias_shape is not None:
        dbias = _sum_to_shape(ds_bhgqk.reshape(b, h, q_len, kv_len), spec.bias_shape).astype(spec.bias_dtype)
    grads = (dq_bqhd, dk_bkhd, dv_bkhd, dbias)
    return tuple(_match_varying(g, axes) for g, axes in zip(grads, spec.varying)) + (None,)


def _sum_to_shape(x, shape):
    """Sum ``x`` over the dimensions that ``shape`` broadcasts (missing leading dims or size 1)."""
    lead = x.ndim - len(shape)
    axes = tuple(range(lead)) + tuple(lead + i for i, n in enumerate(shape) if n == 1 and x.shape[lead + i] != 1)
    return jnp.sum(x, axis=axes).reshape(shape)


def _varying(x) -> frozenset:
    """The ``jax.shard_map`` mesh axes ``x`` varies over (empty outside shard_map or for None)."""
    if x is None:
        return frozenset()
    return frozenset(getattr(getattr(jax.typeof(x), "manual_axis_type", None), "varying", ()))


def _match_varying(ct, axes: frozenset):
    """A cotangent with its primal's shard_map type: summed over the axes the primal is
    replicated on (each device holds part of its gradient), marked varying where the primal is."""
    if ct is None:
        return None
    have = _varying(ct)
    if have - axes:
        ct = jax.lax.psum(ct, tuple(sorted(have - axes)))
    if axes - have:
        ct = jax.lax.pcast(ct, tuple(sorted(axes - have)), to="varying")
    return ct


_attention.defvjp(_attention_fwd, _attention_bwd)
