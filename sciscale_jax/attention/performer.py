"""Performer FAVOR+: Choromanski et al. 2021, "Rethinking Attention with Performers".

The softmax kernel exp(x . y) with x = q sqrt(scale), y = k sqrt(scale) is estimated by
positive random features phi(x) = exp(W x - |x|^2 / 2) / sqrt(m), whose m rows of W are
drawn as blocks of orthogonal Gaussian directions with chi-distributed lengths (positive
orthogonal random features). Attention becomes phi(Q) (phi(K)^T V) normalised by
phi(Q) (phi(K)^T 1): time and memory linear in sequence length. Causal attention uses
prefix sums of phi(k_j) v_j^T over keys (end-aligned, as in ``xla.py``), walked in chunks
of ``causal_chunk`` queries so only an [m, head_dim] running state is carried.

Redraws are explicit: the features come from ``key`` when given, else from the module's
stored seed folded with ``step // redraw_interval`` when ``step`` is given, else from the
seed alone. Nothing is mutated by a call; the seed is a non-trainable ``FeatureSeed``
variable. Row and key maxima are subtracted inside the exponentials for stability; they
cancel between numerator and denominator.

What it cannot honour, refused with a ValueError: an additive bias and any mask that
depends on the query or the head (the kernel factorises over queries and keys); key
padding masks [batch, 1, 1, kv_len] are honoured by zeroing the padded keys' features.
A query with no key to attend gives zeros.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from sciscale_jax.attention.core import check_dtypes, check_shapes
from sciscale_jax.attention.linformer import key_padding_mask


class FeatureSeed(nnx.Variable):
    """The raw key data the random features are drawn from (not a trainable parameter)."""


def orthogonal_features(key, num_features: int, head_dim: int):
    """W [num_features, head_dim]: stacked orthogonal blocks, each row's norm drawn as a Gaussian vector's."""
    num_blocks = -(-num_features // head_dim)
    block_key, norm_key = jax.random.split(key)
    gauss_ndd = jax.random.normal(block_key, (num_blocks, head_dim, head_dim), jnp.float32)
    q_ndd = _gram_schmidt(gauss_ndd)  # Q of the QR with R's diagonal positive: Haar-distributed
    directions_md = q_ndd.transpose(0, 2, 1).reshape(num_blocks * head_dim, head_dim)[:num_features]
    norms_m = jnp.linalg.norm(jax.random.normal(norm_key, (num_features, head_dim), jnp.float32), axis=-1)
    return directions_md * norms_m[:, None]


def _gram_schmidt(a_ndd):
    """Orthonormalise the columns of each matrix (classical Gram-Schmidt, applied twice for accuracy).

    Pure XLA ops on purpose: the LAPACK QR custom call hung on CPU when several layers drew
    features concurrently inside one compiled train step (4 layers, embed 128, seq 128).
    """
    dim = a_ndd.shape[-1]

    def column(j, q_ndd):
        v_nd = a_ndd[:, :, j]
        for _ in range(2):
            v_nd = v_nd - jnp.einsum("ndk,nk->nd", q_ndd, jnp.einsum("ndk,nd->nk", q_ndd, v_nd))
        v_nd = v_nd / jnp.linalg.norm(v_nd, axis=-1, keepdims=True)
        return q_ndd.at[:, :, j].set(v_nd)

    return jax.lax.fori_loop(0, dim, column, jnp.zeros_like(a_ndd))


def positive_features(x_bshd, w_md, *, is_query: bool, valid_bs=None):
    """phi(x) = exp(W x - |x|^2/2 - c) / sqrt(m), [B,S,H,m]; c is a row max (queries) or a per-head max (keys)."""
    proj_bshm = jnp.einsum("bshd,md->bshm", x_bshd, w_md)
    sq_norm_bsh1 = 0.5 * jnp.sum(x_bshd * x_bshd, axis=-1, keepdims=True)
    if is_query:
        shift = jnp.max(proj_bshm, axis=-1, keepdims=True)
    else:  # one constant per (batch, head) over valid keys, so it cancels in the ratio
        masked = proj_bshm if valid_bs is None else jnp.where(valid_bs[:, :, None, None], proj_bshm, -jnp.inf)
        shift = jnp.max(masked, axis=(1, 3), keepdims=True)
        shift = jnp.where(jnp.isfinite(shift), shift, 0.0)
    phi_bshm = jnp.exp(proj_bshm - sq_norm_bsh1 - jax.lax.stop_gradient(shift)) * w_md.shape[0] ** -0.5
    if valid_bs is not None:
        phi_bshm = jnp.where(valid_bs[:, :, None, None], phi_bshm, 0.0)
    return phi_bshm


def causal_prefix_sums(phi_q, phi_k, v_bkhd, chunk: int):
    """Numerator [B,Q,H,D] and denominator [B,Q,H] of causal FAVOR+, query i seeing keys j <= i + K - Q.

    Keys beyond the aligned span seed the running state; the aligned span is walked in
    chunks: the state sum_j phi(k_j) v_j^T from earlier chunks plus a masked quadratic
    term inside the chunk, so memory stays O(chunk^2 + m D) per step instead of O(N m D).
    """
    q_len, kv_len = phi_q.shape[1], phi_k.shape[1]
    span = min(q_len, kv_len)
    lead_k, lead_q = kv_len - span, q_len - span  # keys every query sees; queries that see none
    state_bhmd = jnp.einsum("bkhm,bkhd->bhmd", phi_k[:, :lead_k], v_bkhd[:, :lead_k])
    zsum_bhm = phi_k[:, :lead_k].sum(axis=1)
    chunk = min(chunk, span)
    pad = -span % chunk
    num_chunks = (span + pad) // chunk

    def blocks(x):  # [B, span, ...] -> [num_chunks, B, chunk, ...], zero-padded
        x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
        return x.reshape(x.shape[0], num_chunks, chunk, *x.shape[2:]).swapaxes(0, 1)

    tril_cc = jnp.tril(jnp.ones((chunk, chunk), bool))

    @jax.checkpoint
    def step(carry, blk):
        state_bhmd, zsum_bhm = carry
        phi_q_c, phi_k_c, v_c = blk
        a_bhqk = jnp.where(tril_cc, jnp.einsum("bqhm,bkhm->bhqk", phi_q_c, phi_k_c), 0.0)
        num = jnp.einsum("bqhm,bhmd->bqhd", phi_q_c, state_bhmd) + jnp.einsum("bhqk,bkhd->bqhd", a_bhqk, v_c)
        den = jnp.einsum("bqhm,bhm->bqh", phi_q_c, zsum_bhm) + a_bhqk.sum(-1).transpose(0, 2, 1)
        state_bhmd = state_bhmd + jnp.einsum("bkhm,bkhd->bhmd", phi_k_c, v_c)
        return (state_bhmd, zsum_bhm + phi_k_c.sum(axis=1)), (num, den)

    xs = (blocks(phi_q[:, lead_q:]), blocks(phi_k[:, lead_k:]), blocks(v_bkhd[:, lead_k:]))
    _, (num_n, den_n) = jax.lax.scan(step, (state_bhmd, zsum_bhm), xs)
    num_bqhd = num_n.swapaxes(0, 1).reshape(phi_q.shape[0], -1, *num_n.shape[3:])[:, :span]
    den_bqh = den_n.swapaxes(0, 1).reshape(phi_q.shape[0], -1, den_n.shape[-1])[:, :span]
    num_bqhd = jnp.pad(num_bqhd, ((0, 0), (lead_q, 0), (0, 0), (0, 0)))
    den_bqh = jnp.pad(den_bqh, ((0, 0), (lead_q, 0), (0, 0)))
    return num_bqhd, den_bqh


class PerformerAttention(nnx.Module):
    """FAVOR+ attention with the front-door layout: q [B,Q,H,D], k/v [B,K,Hkv,D] -> [B,Q,H,D]."""

    def __init__(self, head_dim: int, num_features: int = 256, *, redraw_interval: int = 1000,
                 causal_chunk: int = 128, rngs: nnx.Rngs):
        for name, value in (("head_dim", head_dim), ("num_features", num_features),
                            ("redraw_interval", redraw_interval), ("causal_chunk", causal_chunk)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}={value!r} must be a positive integer")
        self.head_dim, self.num_features, self.redraw_interval = head_dim, num_features, redraw_interval
        self.causal_chunk = causal_chunk
        self.seed = FeatureSeed(jax.random.key_data(rngs.params()))

    def feature_key(self, *, key=None, step=None):
        """The key the features are drawn from: ``key``, else seed folded with step // redraw_interval."""
        if key is not None:
            return key
        seed = jax.random.wrap_key_data(self.seed[...])
        return seed if step is None else jax.random.fold_in(seed, step // self.redraw_interval)

    def draw_features(self, *, key=None, step=None):
        """The random feature matrix W [num_features, head_dim] used by a call with these arguments."""
        return orthogonal_features(self.feature_key(key=key, step=step), self.num_features, self.head_dim)

    def __call__(self, q_bqhd, k_bkhd, v_bkhd, *, mask=None, bias=None, causal=False, scale=None,
                 key=None, step=None):
        check_shapes(q_bqhd, k_bkhd, v_bkhd, bias, mask)
        check_dtypes(q_bqhd, k_bkhd, v_bkhd, bias, mask)
        if bias is not None:
            raise ValueError(f"Performer cannot honour an additive bias (got shape {tuple(bias.shape)}): "
                             f"the softmax kernel factorises over queries and keys")
        batch, q_len, num_heads, head_dim = q_bqhd.shape
        kv_len, kv_heads = k_bkhd.shape[1], k_bkhd.shape[2]
        if head_dim != self.head_dim:
            raise ValueError(f"head_dim={head_dim} of q differs from the module's head_dim={self.head_dim}")
        scale = head_dim ** -0.5 if scale is None else scale
        keep_bk = key_padding_mask(mask, batch, kv_len, "Performer")
        if kv_heads != num_heads:
            k_bkhd = jnp.repeat(k_bkhd, num_heads // kv_heads, axis=2)
            v_bkhd = jnp.repeat(v_bkhd, num_heads // kv_heads, axis=2)
        w_md = self.draw_features(key=key, step=step)
        root = jnp.sqrt(jnp.float32(scale))
        phi_q = positive_features(q_bqhd.astype(jnp.float32) * root, w_md, is_query=True)
        phi_k = positive_features(k_bkhd.astype(jnp.float32) * root, w_md, is_query=False, valid_bs=keep_bk)
        v_bkhd = v_bkhd.astype(jnp.float32)
        if not causal:
            kv_bhmd = jnp.einsum("bkhm,bkhd->bhmd", phi_k, v_bkhd)
            num_bqhd = jnp.einsum("bqhm,bhmd->bqhd", phi_q, kv_bhmd)
            den_bqh = jnp.einsum("bqhm,bhm->bqh", phi_q, phi_k.sum(axis=1))
        else:
            num_bqhd, den_bqh = causal_prefix_sums(phi_q, phi_k, v_bkhd, self.causal_chunk)
        attended = den_bqh > 0
        out_bqhd = jnp.where(attended[..., None], num_bqhd / jnp.where(attended, den_bqh, 1.0)[..., None], 0.0)
        return out_bqhd.astype(q_bqhd.dtype)
