"""The Evoformer block under Dynamic Axial Parallelism (Cheng et al. 2022, FastFold), written
against a ``parallel.dap.Layout`` so the same code runs on one shard or, with the degree-1
layout, unsharded.

Per block, with P the ``dap`` degree (AlphaFold's order, Alg 6):

- MSA row attention with pair bias on m sharded over sequences [B, S/P, R, c_m]; the pair
  bias [B, H, R, R] is projected from the local pair rows and all-gathered once.
- all_to_all of m to residue sharding [B, S, R/P, c_m]: column attention, MSA transition
  and outer product mean (left projection local, right projection all-gathered), whose
  update lands on the local pair rows [B, R/P, R, c_z].
- triangle multiplication outgoing on pair rows (the right operand gathered); all_to_all to
  pair columns [B, R, R/P, c_z]; incoming (the right operand gathered); all_to_all back to
  rows; triangle attention around the starting node (bias gathered); all_to_all to columns;
  ending node (bias gathered) and the pair transition; all_to_all of m and z back.

Each sub-module is evaluated by its own parameters and helpers (``evoformer_modules``), so the
arithmetic is the single-device block's; chunking (``chunk_size``), sub-module remat and the
checkpoint names apply here as there. Dropout masks are drawn whole from the block's keys
and sliced (``Layout.dropout``), so a DAP run equals the one-device run.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from sciscale_jax import remat
from sciscale_jax.models.evoformer_modules import OPM_EPS, _pair_bias, chunked
from sciscale_jax.models.stack import run_layers
from sciscale_jax.parallel import dap


def _row_attention(mod, lay, m_s, z_r, mask_s):
    cfg = mod.cfg
    bias = lay.gather(_pair_bias(mod.feat_2d_norm(z_r), mod.feat_2d_weights, cfg.dtype), 2)  # [B, H, R, R]
    fn = lambda m, mask: mod.attention(mod.query_norm(m), bias, mask)  # noqa: E731
    return chunked(fn, cfg.chunk_size, (m_s, mask_s), (1, 1), 1, cfg.chunk_remat)


def _outer_product_mean(mod, lay, m_r, mask_r, msa_mask):
    cfg, dt = mod.cfg, mod.cfg.dtype
    mask = mask_r.astype(dt)[..., None]
    x = mod.layer_norm_input(m_r)
    a = checkpoint_name(mask * mod.left_projection(x), remat.OPM_PROJ)            # rows i: local
    b = lay.gather(checkpoint_name(mask * mod.right_projection(x), remat.OPM_PROJ), 2)  # columns j: all
    norm = jnp.einsum("bsi,bsj->bij", mask[..., 0], msa_mask.astype(dt),
                      preferred_element_type=jnp.float32)[..., None]

    def fn(a_bsic, norm_bij1):
        outer = jnp.einsum("bsic,bsje->bijce", a_bsic, b)
        out = jnp.einsum("bijce,cef->bijf", outer, mod.output_w[...].astype(dt)) + mod.output_b[...].astype(dt)
        return (out / (OPM_EPS + norm_bij1)).astype(dt)
    return chunked(fn, cfg.chunk_size, (a, norm), (2, 1), 1, cfg.chunk_remat)


def _tri_mul_outgoing(mod, lay, z_r, mask_rows):
    """out[i, j] = sum_k left[i, k] right[j, k] on local rows i; right gathered over rows j."""
    cfg = mod.cfg
    mask = mask_rows.astype(cfg.dtype)[..., None]
    x = mod.layer_norm_input(z_r)
    right = lay.gather(mod._right(x, mask), 1)

    def fn(x_rows, mask_rows):
        t = mod.output_projection(mod.center_layer_norm(
            jnp.einsum("bikc,bjkc->bijc", mod._left(x_rows, mask_rows), right)))
        return t * jax.nn.sigmoid(mod.gating_linear(x_rows))
    return chunked(fn, cfg.chunk_size, (x, mask), (1, 1), 1, cfg.chunk_remat)


def _tri_mul_incoming(mod, lay, z_c, mask_cols):
    """out[i, j] = sum_k left[k, j] right[k, i] on local columns j; right gathered over i."""
    cfg = mod.cfg
    mask = mask_cols.astype(cfg.dtype)[..., None]
    x = mod.layer_norm_input(z_c)                   # x[:, k, j_local]
    left = mod._left(x, mask)
    right = lay.gather(mod._right(x, mask), 2)      # right[:, k, i] for every i

    def fn(right_i, x_i):
        t = mod.output_projection(mod.center_layer_norm(jnp.einsum("bkjc,bkic->bijc", left, right_i)))
        return t * jax.nn.sigmoid(mod.gating_linear(x_i))
    return chunked(fn, cfg.chunk_size, (right, x), (2, 1), 1, cfg.chunk_remat)


def _tri_attention(mod, lay, z_rows, mask_rows):
    """Attention along each local row; the bias [B, H, R, R] from every row, gathered. The ending
    node passes the transposed column block (its rows are the pair's columns)."""
    cfg = mod.cfg
    x = mod.query_norm(z_rows)
    bias = lay.gather(_pair_bias(x, mod.feat_2d_weights, cfg.dtype), 2)
    fn = lambda x, mask: mod.attention(x, bias, mask)  # noqa: E731
    return chunked(fn, cfg.chunk_size, (x, mask_rows), (1, 1), 1, cfg.chunk_remat)


def dap_block(block, m_s, z_r, msa_mask, pair_mask, key, lay):
    """One Evoformer block on a shard: m_s [B, S/P, R, c_m] (sequence-sharded), z_r [B, R/P, R, c_z]
    (row-sharded), masks [B, S, R] and [B, R, R] whole -> (m_s, z_r) after the block."""
    cfg = block.config
    keys = [None] * 5 if key is None else list(jax.random.split(key, 5))
    msa_sizes, pair_sizes = (lay.msa_rows, lay.residues), (lay.residues, lay.residues)

    def up(fn, *args):
        if not cfg.remat_modules:
            return fn(*args)
        return jax.checkpoint(fn, policy=jax.checkpoint_policies.nothing_saveable)(*args)

    mask_s, mask_r = lay.local(msa_mask, 1), lay.local(msa_mask, 2)
    pm_rows, pm_cols = lay.local(pair_mask, 1), lay.local(pair_mask, 2)
    m = checkpoint_name(m_s, remat.LAYER_INPUT)
    z = checkpoint_name(z_r, remat.LAYER_INPUT)
    row = up(functools.partial(_row_attention, block.msa_row_attention_with_pair_bias, lay), m, z, mask_s)
    m = m + lay.dropout(checkpoint_name(row, remat.ATTN_OUT), cfg.msa_dropout, keys[0], 1, 1, msa_sizes)
    m = lay.swap(m, 2, 1)                                                       # [B, S, R/P, c_m]
    column = block.msa_column_global_attention if block.extra else block.msa_column_attention
    m = m + checkpoint_name(up(column, m, mask_r), remat.ATTN_OUT)
    m = m + checkpoint_name(up(block.msa_transition, m), remat.MLP_OUT)
    z = z + up(functools.partial(_outer_product_mean, block.outer_product_mean, lay), m, mask_r, msa_mask)
    out = up(functools.partial(_tri_mul_outgoing, block.triangle_multiplication_outgoing, lay), z, pm_rows)
    z = z + lay.dropout(out, cfg.pair_dropout, keys[1], 1, 1, pair_sizes)
    z = lay.swap(z, 2, 1)                                                       # [B, R, R/P, c_z]
    out = up(functools.partial(_tri_mul_incoming, block.triangle_multiplication_incoming, lay), z, pm_cols)
    z = z + lay.dropout(out, cfg.pair_dropout, keys[2], 1, 2, pair_sizes)
    z = lay.swap(z, 1, 2)                                                       # [B, R/P, R, c_z]
    start = up(functools.partial(_tri_attention, block.triangle_attention_starting_node, lay), z, pm_rows)
    z = z + lay.dropout(checkpoint_name(start, remat.ATTN_OUT), cfg.pair_dropout, keys[3], 1, 1, pair_sizes)
    z = lay.swap(z, 2, 1)                                                       # [B, R, R/P, c_z]
    end_fn = functools.partial(_tri_attention, block.triangle_attention_ending_node, lay)
    end = jnp.swapaxes(up(end_fn, jnp.swapaxes(z, 1, 2), jnp.swapaxes(pm_cols, 1, 2)), 1, 2)
    z = z + lay.dropout(checkpoint_name(end, remat.ATTN_OUT), cfg.pair_dropout, keys[4], 2, 2, pair_sizes)
    z = z + checkpoint_name(up(block.pair_transition, z), remat.MLP_OUT)
    return lay.swap(m, 1, 2), lay.swap(z, 1, 2)                                 # back to S and row sharding


def dap_stack(stack, m, z, msa_mask, pair_mask, keys, mesh=None):
    """``EvoformerStack`` forward under DAP over the ``dap`` axis of ``mesh`` (default: the mesh
    set with ``jax.set_mesh``); same results as ``stack(m, z, ...)`` on one device."""
    mesh, degree = dap.dap_degree(mesh)
    cfg = stack.config
    dap.check_dap(dict(mesh.shape), cfg.attention)
    graphdef, state = nnx.split(stack.blocks)

    def local(state, m, z, msa_mask, pair_mask, keys, lay):
        blocks = nnx.merge(graphdef, state)
        return run_layers(blocks, (m, z), msa_mask, pair_mask, policy=cfg.remat, keys=keys,
                          apply=lambda block, mz, mm, pm, key: dap_block(block, *mz, mm, pm, key, lay))

    return dap.run_sharded(local, state, m, z, msa_mask, pair_mask, keys, mesh=mesh)
