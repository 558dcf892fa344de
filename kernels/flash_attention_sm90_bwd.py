"""Backward of the sm90 flash attention (``flash_attention_sm90``) in Pallas Mosaic GPU.

Kernels after FlashAttention-2's backward (Dao 2023) and, optionally, FlashAttention-3's (Shah et
al. 2024), each with the forward's structure: a producer warpgroup streams tiles through a ring of
``stages`` shared-memory slots (TMA copies completing on one "ready" barrier per slot, freed by both
consumers on a "free" barrier), and two consumer warpgroups own 64 rows each of what stays resident.

  dK/dV: a CTA owns 2 x block_kv keys of one kv head and streams (Q, dO, lse, delta) tiles of
         every query head of its GQA group, accumulating dK and dV in registers (causal: only the
         query tiles at or below its keys).
  dQ:    a CTA owns 2 x block_q queries of one head and streams (K, V) tiles; it recomputes QK^T
         and dO V^T, so the two kernels run 7 tile products where one pass needs 5.
  dbias: a CTA owns one [2 x block_q, block_kv] tile of the bias as given (before broadcasting)
         and streams the (Q, dO, lse, delta, K, V) tiles of every batch row and head the bias
         broadcasts over, summing dS in registers: the bias gradient in the bias's own shape
         without an [B, H, Q, K] intermediate or atomic adds (it recomputes QK^T and dO V^T once
         more: 9 products in all with a bias).
  fused (``fused=True``, FlashAttention-3's layout): the dK/dV kernel alone. It also forms each
         query tile's share of dQ, dS K, from the dS it already has (written to shared memory and
         read transposed) and adds it into a float32 dQ in global memory with a TMA reduce-add,
         and adds dS itself into a float32 dbias^T at the bias's (broadcast) batch row and head:
         5 products with or without a bias, at the price of float32 reduce-adds in L2 and shared
         memory for the float32 tiles (2 stages at head_dim 128, and not with a bias ring there).
Probabilities come back from the forward's base-2 log-sum-exp; delta = rowsum(dO * O).

Interpreting (``interpret=True``), the fused kernel's reduce-adds are the one thing done
differently: jax's Mosaic GPU interpreter has no TMA reductions, so each consumer warpgroup reads
the tile, adds and writes it back (grid points run one after another there; dQ, which both
consumers add to, has a buffer per consumer, summed after the kernel). The lowering for CUDA,
reduce-adds included, is checked on any host by the tests.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax

from sciscale_jax.kernels.flash_attention_sm90 import (
    _COMPUTE_WGS, _LOG2E, _Ops, _bias_block, _check_blocks, _concrete, _forward, _interpret_params, _key_bias_block,
    _mosaic_gpu, _pad_to, _padded_inputs, _plus_key_bias, _tiled, _tuned, check_sm90_inputs)

# Configurations the tuner measures (``kernels/sm90_tuning.py``), keyed by whether there is a bias:
# (stages, fused) at 64 x 64 tiles; the first is the default where tuning is off or not on an sm90
# GPU, the tuner's pick on an H200 at head_dim 128, seq 4096 (3 stages of the bias ring do not fit
# at head_dim 128). The fused backward joins them where it fits, since its GPU tests passed on an
# H200 (``SM90_FUSED_GPU_TESTED``; tests/test_flash_sm90.py -m gpu, 2026-12-04). It was slower than
# the two-kernel backward at head_dim 128 without a bias there (0.74-0.89x cuDNN against 0.88-1.09x,
# benchmarks/results/attention_gpu_h200_variants_2026-12-04.md), so it stays out of the defaults and
# the tuner keeps it only where it measures faster.
SM90_FUSED_GPU_TESTED = True
BWD_CANDIDATES = {False: ((3, False), (2, False)), True: ((2, False), (3, False))}
FUSED_CANDIDATES = ((2, True),)  # with or without a bias
_SMEM_BYTES = 227 * 1024  # shared memory one CTA may use on an H100/H200


def bwd_candidates(biased: bool) -> tuple:
    """The backward configurations the tuner may pick from: the fused ones once GPU-tested."""
    return BWD_CANDIDATES[biased] + (FUSED_CANDIDATES if SM90_FUSED_GPU_TESTED else ())


def fused_fits(head_dim, itemsize, *, has_bias, has_key_bias, stages, bias_grad=True, block_q=64,
               block_kv=64) -> bool:
    """Whether the fused kernel's shared memory fits one CTA: resident K, V (and key bias), the ring
    of Q, dO, lse, delta (and bias) tiles, and per consumer a dS tile, a float32 dQ tile (and, with a
    bias gradient, a float32 dbias tile)."""
    wgs = _COMPUTE_WGS
    mine = 2 * wgs * block_kv * head_dim * itemsize + (wgs * block_kv * 4 if has_key_bias else 0)
    ring = stages * (2 * block_q * head_dim * itemsize + 2 * block_q * 4
                     + (wgs * block_kv * block_q * itemsize if has_bias else 0))
    extra = wgs * (block_kv * block_q * itemsize + block_q * head_dim * 4
                   + (block_kv * block_q * 4 if has_bias and bias_grad else 0))
    return mine + ring + extra + 1024 <= _SMEM_BYTES  # 1 KiB for barriers and alignment


def _streaming(pl, plgpu, wg, *, stages, n_steps, mine, ring, own_arrivals, ring_arrivals, consumer, load):
    """The backward kernels' common frame. Scratch: ``mine`` (what each consumer keeps) and ``ring``
    (``stages`` slots of streamed tiles); barriers: one per consumer for its own copies
    (``own_arrivals`` each), and per slot a "ready" one (``ring_arrivals`` copies) and a "free" one
    (both consumers). The consumer warpgroups run ``consumer(mine, ring, own_ready, ready, free)``;
    the producer issues ``load(ring, step, slot, ready_barrier)`` for every step, reusing a slot
    once both consumers freed it, and then awaits the last frees (every barrier phase observed)."""

    def body(mine, ring, own_ready, ready, free):
        @pl.when(wg < _COMPUTE_WGS)
        def _consumer():
            plgpu.set_max_registers(232, action="increase")
            consumer(mine, ring, own_ready, ready, free)

        @pl.when(wg == _COMPUTE_WGS)
        def _producer():
            plgpu.set_max_registers(40, action="decrease")

            def released(step):
                slot = lax.rem(step, jnp.array(stages, step.dtype))
                plgpu.barrier_wait(free.at[slot])
                return slot

            for i in range(stages):
                pl.when(i < n_steps)(functools.partial(load, ring, jnp.int32(i), i, ready.at[i]))

            @pl.loop(0, n_steps - stages)
            def _(i):
                slot = released(i)
                load(ring, i + stages, slot, ready.at[slot])

            @pl.loop(jnp.maximum(n_steps - stages, 0), n_steps)
            def _(i):
                released(i)

    pl.run_scoped(
        body, mine, ring,
        plgpu.Barrier(num_arrivals=own_arrivals, num_barriers=_COMPUTE_WGS),
        plgpu.Barrier(num_arrivals=ring_arrivals, num_barriers=stages),
        plgpu.Barrier(num_arrivals=_COMPUTE_WGS, num_barriers=stages),
        collective_axes="wg",
    )


def _copy_query_rows(pl, plgpu, refs, dsts, b, h, start, size, barrier):
    """Q and dO rows [start, start + size) of batch row b, head h, with their lse and delta, into
    ``dsts`` (four shared-memory refs), completing on ``barrier`` (four arrivals)."""
    q_ref, do_ref, lse_ref, delta_ref = refs
    rows, span = (b, pl.ds(start, size), h), (b, h, pl.ds(start, size))
    for src, dst in zip((q_ref.at[rows], do_ref.at[rows], lse_ref.at[span], delta_ref.at[span]), dsts):
        plgpu.copy_gmem_to_smem(src, dst, barrier)


def _bwd_kernels(q, k, v, bias, do, lse2, delta, *, causal, scale, kv_len, block_q, block_kv, stages,
                 bias_grad, interpret, key_bias=None, fused=False):
    """dq [B, Qp, H, D], dk, dv [B, Kp, Hkv, D] and dbias [Bb, Hb, Qp, Kp] (None unless bias_grad),
    in q's dtype (dbias summed in float32 and rounded once, or left float32 when fused), on padded
    inputs: q, do [B, Qp, H, D]; k, v [B, Kp, Hkv, D]; bias None or [Bb, Hb, Qp, Kp] in q's dtype;
    lse2, delta [B, H, Qp] float32; key_bias None or [Bk, Kp] float32 (no gradient)."""
    pl, plgpu = _mosaic_gpu()
    ops = _Ops(interpret)
    batch, q_pad, heads, head_dim = q.shape
    k_pad, kv_heads = k.shape[1], k.shape[2]
    group = heads // kv_heads
    dtype = q.dtype
    has_bias, has_key_bias = bias is not None, key_bias is not None
    fused_dbias = fused and has_bias and bias_grad  # the fused kernel sums dbias too
    logit_scale = scale * _LOG2E
    mask_padded_keys = kv_len < k_pad and not causal
    wgs = _COMPUTE_WGS
    row_layout, col_layout = plgpu.Layout.WGMMA.reduce(1), plgpu.Layout.WGMMA.reduce(0)
    params = dict(num_threads=wgs + 1, thread_name="wg", interpret=_interpret_params(interpret),
                  compiler_params=plgpu.CompilerParams(approx_math=True))

    def smem(*shape, dtype=dtype):  # tiles the products read are tiled and swizzled; vectors are not
        if len(shape) > 2:
            return plgpu.SMEM(shape, dtype, transforms=_tiled(plgpu, dtype, shape[-1]))
        return plgpu.SMEM(shape, dtype)

    def probabilities(s, lse, row_axis, q_rows, k_cols):
        """exp(logits - lse) of a tile; s in base 2 (bias added), rows/cols as absolute positions."""
        keep = None
        if causal:
            keep = q_rows >= k_cols
        if mask_padded_keys:
            keep = (k_cols < kv_len) if keep is None else keep & (k_cols < kv_len)
        if keep is not None:
            s = jnp.where(keep, s, -jnp.inf)
        return jnp.exp2(s - lax.broadcast_in_dim(lse, s.shape, [row_axis]))

    # ---- dQ: CTA = (head, 2 x block_q queries, batch); K, V (and bias) tiles stream ----
    def dq_entry(q_ref, k_ref, v_ref, *rest):
        rest = list(rest)
        bias_ref = rest.pop(0) if has_bias else None
        kb_ref = rest.pop(0) if has_key_bias else None
        do_ref, lse_ref, delta_ref, dq_ref = rest
        h, b, wg = lax.axis_index("heads"), lax.axis_index("batch"), lax.axis_index("wg")
        kv_head = lax.div(h, jnp.array(group, h.dtype))
        cta_q = lax.axis_index("q_seq") * (wgs * block_q)
        n_steps = pl.cdiv(cta_q + wgs * block_q, jnp.array(block_kv, jnp.int32)) if causal else k_pad // block_kv

        def consumer(mine, ring, own_ready, ready, free):
            q_smem, do_smem, lse_smem, delta_smem = mine
            k_smem, v_smem, bias_smem, kb_smem = ring
            q_base = cta_q + wg * block_q
            _copy_query_rows(pl, plgpu, (q_ref, do_ref, lse_ref, delta_ref), [x.at[wg] for x in mine], b, h, q_base,
                             block_q, own_ready.at[wg])
            plgpu.barrier_wait(own_ready.at[wg])
            lse = ops.rows(lse_smem.at[wg], row_layout)
            delta = ops.rows(delta_smem.at[wg], row_layout)
            q_rows = ops.iota((block_q, block_kv), 0) + q_base

            def step(i, dq):
                slot = lax.rem(i, jnp.array(stages, i.dtype))
                plgpu.barrier_wait(ready.at[slot])
                s = ops.mma(None, q_smem.at[wg], k_smem.at[slot], transpose_b=True) * logit_scale
                if has_bias:
                    s = s + bias_smem[slot, pl.ds(wg * block_q, block_q)].astype(jnp.float32) * _LOG2E
                if has_key_bias:
                    s = _plus_key_bias(ops, s, kb_smem.at[slot], 1)
                p = probabilities(s, lse, 0, q_rows, ops.iota((block_q, block_kv), 1) + i * block_kv)
                dp = ops.mma(None, do_smem.at[wg], v_smem.at[slot], transpose_b=True)
                ds = p * (dp - lax.broadcast_in_dim(delta, dp.shape, [0]))
                dq = ops.mma(dq, ds.astype(dtype), k_smem.at[slot])
                if has_bias or has_key_bias:
                    plgpu.commit_smem()  # the bias reads complete before the producer's next TMA write
                plgpu.barrier_arrive(free.at[slot])
                return dq

            dq = lax.fori_loop(0, n_steps, step,
                               ops.layout(jnp.zeros((block_q, head_dim), jnp.float32), plgpu.Layout.WGMMA))
            q_smem.at[wg][...] = (dq * scale).astype(dtype)
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(q_smem.at[wg], dq_ref.at[b, pl.ds(q_base, block_q), h])
            plgpu.wait_smem_to_gmem(0)

        def load(ring, i, slot, barrier):
            k_smem, v_smem, bias_smem, kb_smem = ring
            keys = (b, pl.ds(i * block_kv, block_kv), kv_head)
            plgpu.copy_gmem_to_smem(k_ref.at[keys], k_smem.at[slot], barrier)
            plgpu.copy_gmem_to_smem(v_ref.at[keys], v_smem.at[slot], barrier)
            if has_bias:
                tile = _bias_block(bias_ref, b, h, pl.ds(cta_q, wgs * block_q), pl.ds(i * block_kv, block_kv))
                plgpu.copy_gmem_to_smem(tile, bias_smem.at[slot], barrier)
            if has_key_bias:
                plgpu.copy_gmem_to_smem(_key_bias_block(kb_ref, b, pl.ds(i * block_kv, block_kv)), kb_smem.at[slot],
                                        barrier)

        _streaming(pl, plgpu, wg, stages=stages, n_steps=n_steps, consumer=consumer, load=load,
                   mine=(smem(wgs, block_q, head_dim), smem(wgs, block_q, head_dim),
                         smem(wgs, block_q, dtype=jnp.float32), smem(wgs, block_q, dtype=jnp.float32)),
                   ring=(smem(stages, block_kv, head_dim), smem(stages, block_kv, head_dim),
                         smem(stages, wgs * block_q, block_kv) if has_bias else None,
                         smem(stages, block_kv, dtype=jnp.float32) if has_key_bias else None),
                   own_arrivals=4, ring_arrivals=2 + has_bias + has_key_bias)

    bias_ops = ((bias,) if has_bias else ()) + ((key_bias,) if has_key_bias else ())
    if not fused:
        dq = plgpu.kernel(dq_entry, out_type=jax.ShapeDtypeStruct(q.shape, dtype),
                          grid=(heads, q_pad // (wgs * block_q), batch), grid_names=("heads", "q_seq", "batch"),
                          **params)(q, k, v, *bias_ops, do, lse2, delta)

    # ---- dK, dV: CTA = (kv head, 2 x block_kv keys, batch); Q, dO, lse, delta (bias^T) tiles stream ----
    bias_t = None if bias is None else jnp.swapaxes(bias, 2, 3)  # [Bb, Hb, Kp, Qp]: key-major tiles
    q_tiles = q_pad // block_q

    def dkv_entry(q_ref, k_ref, v_ref, *rest):
        rest = list(rest)
        bias_ref = rest.pop(0) if has_bias else None
        kb_ref = rest.pop(0) if has_key_bias else None
        do_ref, lse_ref, delta_ref, dk_ref, dv_ref, *accs = rest  # fused: the float32 dQ (and dbias^T)
        kv_head, b, wg = lax.axis_index("heads"), lax.axis_index("batch"), lax.axis_index("wg")
        cta_k = lax.axis_index("kv_seq") * (wgs * block_kv)
        first = lax.div(cta_k, jnp.array(block_q, jnp.int32)) if causal else jnp.int32(0)  # first query tile
        per_head = q_tiles - first
        n_steps = group * per_head

        def tile_of(i):  # step -> (query head, query tile)
            return kv_head * group + lax.div(i, per_head), first + lax.rem(i, per_head)

        def consumer(mine, ring, own_ready, ready, free):
            k_smem, v_smem, kb_smem, ds_smem, dq_smem, db_smem, rmw_ready = mine
            q_smem, do_smem, lse_smem, delta_smem, bias_smem = ring
            k_base = cta_k + wg * block_kv
            keys = (b, pl.ds(k_base, block_kv), kv_head)
            plgpu.copy_gmem_to_smem(k_ref.at[keys], k_smem.at[wg], own_ready.at[wg])
            plgpu.copy_gmem_to_smem(v_ref.at[keys], v_smem.at[wg], own_ready.at[wg])
            if has_key_bias:
                plgpu.copy_gmem_to_smem(_key_bias_block(kb_ref, b, pl.ds(k_base, block_kv)), kb_smem.at[wg],
                                        own_ready.at[wg])
            plgpu.barrier_wait(own_ready.at[wg])
            k_cols = ops.iota((block_kv, block_q), 0) + k_base

            def reduce_add(staging, value, target):
                """target += value through the shared-memory tile ``staging``: a TMA reduce-add
                (interpreting, read, add and write back; see the module docstring)."""
                if interpret:
                    plgpu.copy_gmem_to_smem(target, staging, rmw_ready.at[wg])
                    plgpu.barrier_wait(rmw_ready.at[wg])
                    staging[...] = staging[...] + value
                    plgpu.commit_smem()
                    plgpu.copy_smem_to_gmem(staging, target)
                    plgpu.wait_smem_to_gmem(0)
                else:
                    staging[...] = value
                    plgpu.commit_smem()
                    plgpu.copy_smem_to_gmem(staging, target, reduction_op="add")

            def add_fused(h, qt, ds_t, ds16):
                """This warpgroup's shares of query tile qt of head h: dQ += dS K (dS^T from shared
                memory, read transposed) and, with a bias gradient, dbias^T += dS^T at the bias's
                (broadcast) batch row and head; both float32 in global memory."""
                ds_smem.at[wg][...] = ds16
                plgpu.commit_smem()  # dS visible to the tensor cores' reads
                part = ops.mma(None, ds_smem.at[wg], k_smem.at[wg], transpose_a=True)  # [block_q, head_dim]
                if not interpret:
                    plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # the last reduce-adds have read the staging
                rows = (pl.ds(qt * block_q, block_q), h)
                reduce_add(dq_smem.at[wg], part, accs[0].at[((wg, b) if interpret else (b,)) + rows])
                if db_smem is not None:  # each warpgroup owns its keys' rows of dbias^T: no clash
                    tile = _bias_block(accs[1], b, h, pl.ds(k_base, block_kv), pl.ds(qt * block_q, block_q))
                    reduce_add(db_smem.at[wg], ds_t, tile)

            def step(i, carry):
                dk, dv = carry
                slot = lax.rem(i, jnp.array(stages, i.dtype))
                h, qt = tile_of(i)
                plgpu.barrier_wait(ready.at[slot])
                s_t = ops.mma(None, k_smem.at[wg], q_smem.at[slot], transpose_b=True) * logit_scale
                if has_bias:
                    s_t = s_t + bias_smem[slot, pl.ds(wg * block_kv, block_kv)].astype(jnp.float32) * _LOG2E
                if has_key_bias:  # keys are this tile's rows
                    s_t = _plus_key_bias(ops, s_t, kb_smem.at[wg], 0)
                lse = ops.rows(lse_smem.at[slot], col_layout)
                p_t = probabilities(s_t, lse, 1, ops.iota((block_kv, block_q), 1) + qt * block_q, k_cols)
                dv = ops.mma(dv, p_t.astype(dtype), do_smem.at[slot])
                dp_t = ops.mma(None, v_smem.at[wg], do_smem.at[slot], transpose_b=True)
                delta = ops.rows(delta_smem.at[slot], col_layout)
                ds_t = p_t * (dp_t - lax.broadcast_in_dim(delta, dp_t.shape, [1]))
                ds16 = ds_t.astype(dtype)
                dk = ops.mma(dk, ds16, q_smem.at[slot])
                plgpu.commit_smem()  # the lse, delta (and bias) reads complete before the slot is refilled
                plgpu.barrier_arrive(free.at[slot])
                if fused:
                    add_fused(h, qt, ds_t, ds16)
                return dk, dv

            zeros = ops.layout(jnp.zeros((block_kv, head_dim), jnp.float32), plgpu.Layout.WGMMA)
            dk, dv = lax.fori_loop(0, n_steps, step, (zeros, zeros))
            k_smem.at[wg][...] = (dk * scale).astype(dtype)
            v_smem.at[wg][...] = dv.astype(dtype)
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(k_smem.at[wg], dk_ref.at[keys])
            plgpu.copy_smem_to_gmem(v_smem.at[wg], dv_ref.at[keys])
            plgpu.wait_smem_to_gmem(0)

        def load(ring, i, slot, barrier):
            h, qt = tile_of(i)
            _copy_query_rows(pl, plgpu, (q_ref, do_ref, lse_ref, delta_ref), [x.at[slot] for x in ring[:4]], b, h,
                             qt * block_q, block_q, barrier)
            if has_bias:
                tile = _bias_block(bias_ref, b, h, pl.ds(cta_k, wgs * block_kv), pl.ds(qt * block_q, block_q))
                plgpu.copy_gmem_to_smem(tile, ring[4].at[slot], barrier)

        _streaming(pl, plgpu, wg, stages=stages, n_steps=n_steps, consumer=consumer, load=load,
                   mine=(smem(wgs, block_kv, head_dim), smem(wgs, block_kv, head_dim),
                         smem(wgs, block_kv, dtype=jnp.float32) if has_key_bias else None,
                         # dS^T is read transposed against K: its swizzle must be K's
                         plgpu.SMEM((wgs, block_kv, block_q), dtype, transforms=_tiled(plgpu, dtype, head_dim))
                         if fused else None,
                         plgpu.SMEM((wgs, block_q, head_dim), jnp.float32) if fused else None,
                         plgpu.SMEM((wgs, block_kv, block_q), jnp.float32) if fused_dbias else None,
                         plgpu.Barrier(num_barriers=wgs) if fused and interpret else None),
                   ring=(smem(stages, block_q, head_dim), smem(stages, block_q, head_dim),
                         smem(stages, block_q, dtype=jnp.float32), smem(stages, block_q, dtype=jnp.float32),
                         smem(stages, wgs * block_kv, block_q) if has_bias else None),
                   own_arrivals=2 + has_key_bias, ring_arrivals=5 if has_bias else 4)

    kv_type = jax.ShapeDtypeStruct(k.shape, dtype)
    dkv_operands = (q, k, v, *((bias_t,) if has_bias else ()), *((key_bias,) if has_key_bias else ()), do, lse2, delta)
    dkv_grid = dict(grid=(kv_heads, k_pad // (wgs * block_kv), batch), grid_names=("heads", "kv_seq", "batch"))
    if not fused:
        dk, dv = plgpu.kernel(dkv_entry, out_type=(kv_type, kv_type), **dkv_grid, **params)(*dkv_operands)
    else:  # float32 accumulators starting at zero: dQ (interpreting, one per consumer) and dbias^T
        acc_types = [jax.ShapeDtypeStruct(((wgs,) if interpret else ()) + q.shape, jnp.float32)]
        if fused_dbias:
            acc_types.append(jax.ShapeDtypeStruct(bias.shape[:2] + (k_pad, q_pad), jnp.float32))
        if interpret:
            zeroed = dict(params, interpret=dataclasses.replace(params["interpret"], uninitialized_memory="zero"))
            dk, dv, *accs = plgpu.kernel(dkv_entry, out_type=(kv_type, kv_type, *acc_types), **dkv_grid,
                                         **zeroed)(*dkv_operands)
            accs[0] = accs[0].sum(axis=0)
        else:  # dK, dV and the accumulators as references the kernel writes into
            mesh = plgpu.Mesh(**dkv_grid, num_threads=wgs + 1, thread_name="wg")

            def run(refs):
                pl.kernel(lambda *r: dkv_entry(*r), out_type=(), mesh=mesh,
                          compiler_params=params["compiler_params"])(*dkv_operands, *refs)

            dk, dv, *accs = pl.run_state(run)((jnp.zeros(k.shape, dtype), jnp.zeros(k.shape, dtype),
                                               *(jnp.zeros(t.shape, t.dtype) for t in acc_types)))
        dq = (accs[0] * scale).astype(dtype)
        if fused_dbias:
            return dq, dk, dv, jnp.swapaxes(accs[1], 2, 3)  # float32 [Bb, Hb, Qp, Kp]
    if not (has_bias and bias_grad):
        return dq, dk, dv, None

    # ---- dbias: CTA = one [2 x block_q, block_kv] tile of the bias; every (batch, head) it covers streams ----
    b_bias, h_bias = bias.shape[0], bias.shape[1]
    over_b, over_h = (batch if b_bias == 1 else 1), (heads if h_bias == 1 else 1)
    n_steps = over_b * over_h

    def db_entry(q_ref, k_ref, v_ref, bias_ref, *rest):
        rest = list(rest)
        kb_ref = rest.pop(0) if has_key_bias else None
        do_ref, lse_ref, delta_ref, db_ref = rest
        wg = lax.axis_index("wg")
        bh_index, kt = lax.axis_index("bias"), lax.axis_index("kv_seq")
        bb, bh = lax.div(bh_index, jnp.array(h_bias, jnp.int32)), lax.rem(bh_index, jnp.array(h_bias, jnp.int32))
        cta_q, k_base = lax.axis_index("q_seq") * (wgs * block_q), kt * block_kv

        def pair_of(i):  # step -> (batch row, head)
            i = i.astype(jnp.int32)  # a Python-int loop bound gives int64 steps under jax_enable_x64
            b = lax.div(i, jnp.array(over_h, jnp.int32)) if over_b > 1 else bb
            h = lax.rem(i, jnp.array(over_h, jnp.int32)) if over_h > 1 else bh
            return b, h

        def consumer(bias_smem, ring, own_ready, ready, free):
            q_smem, do_smem, lse_smem, delta_smem, k_smem, v_smem, kb_smem = ring
            mine = pl.ds(wg * block_q, block_q)
            tile = (bb, bh, pl.ds(cta_q + wg * block_q, block_q), pl.ds(k_base, block_kv))
            plgpu.copy_gmem_to_smem(bias_ref.at[tile], bias_smem.at[wg], own_ready.at[wg])
            plgpu.barrier_wait(own_ready.at[wg])
            bias2 = bias_smem[wg].astype(jnp.float32) * _LOG2E
            q_rows = ops.iota((block_q, block_kv), 0) + cta_q + wg * block_q
            k_cols = ops.iota((block_q, block_kv), 1) + k_base

            def step(i, acc):
                slot = lax.rem(i, jnp.array(stages, i.dtype))
                plgpu.barrier_wait(ready.at[slot])
                s = ops.mma(None, q_smem.at[slot, mine], k_smem.at[slot], transpose_b=True) * logit_scale
                if has_key_bias:
                    s = _plus_key_bias(ops, s, kb_smem.at[slot], 1)
                p = probabilities(s + bias2, ops.rows(lse_smem.at[slot, mine], row_layout), 0, q_rows, k_cols)
                dp = ops.mma(None, do_smem.at[slot, mine], v_smem.at[slot], transpose_b=True)
                delta = ops.rows(delta_smem.at[slot, mine], row_layout)
                plgpu.commit_smem()  # the lse and delta reads complete before the slot is refilled
                plgpu.barrier_arrive(free.at[slot])
                return acc + p * (dp - lax.broadcast_in_dim(delta, dp.shape, [0]))

            acc = lax.fori_loop(0, n_steps, step,
                                ops.layout(jnp.zeros((block_q, block_kv), jnp.float32), plgpu.Layout.WGMMA))
            bias_smem.at[wg][...] = acc.astype(dtype)  # the tile's buffer takes the result
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(bias_smem.at[wg], db_ref.at[tile])
            plgpu.wait_smem_to_gmem(0)

        def load(ring, i, slot, barrier):
            b, h = pair_of(i)
            kv_head = lax.div(h, jnp.array(group, h.dtype))
            _copy_query_rows(pl, plgpu, (q_ref, do_ref, lse_ref, delta_ref), [x.at[slot] for x in ring[:4]], b, h,
                             cta_q, wgs * block_q, barrier)
            keys = (b, pl.ds(k_base, block_kv), kv_head)
            plgpu.copy_gmem_to_smem(k_ref.at[keys], ring[4].at[slot], barrier)
            plgpu.copy_gmem_to_smem(v_ref.at[keys], ring[5].at[slot], barrier)
            if has_key_bias:
                plgpu.copy_gmem_to_smem(_key_bias_block(kb_ref, b, pl.ds(k_base, block_kv)), ring[6].at[slot], barrier)

        _streaming(pl, plgpu, wg, stages=stages, n_steps=n_steps, consumer=consumer, load=load,
                   mine=smem(wgs, block_q, block_kv),
                   ring=(smem(stages, wgs * block_q, head_dim), smem(stages, wgs * block_q, head_dim),
                         smem(stages, wgs * block_q, dtype=jnp.float32),
                         smem(stages, wgs * block_q, dtype=jnp.float32),
                         smem(stages, block_kv, head_dim), smem(stages, block_kv, head_dim),
                         smem(stages, block_kv, dtype=jnp.float32) if has_key_bias else None),
                   own_arrivals=1, ring_arrivals=6 + has_key_bias)

    dbias = plgpu.kernel(db_entry, out_type=jax.ShapeDtypeStruct(bias.shape, dtype),
                         grid=(b_bias * h_bias, q_pad // (wgs * block_q), k_pad // block_kv),
                         grid_names=("bias", "q_seq", "kv_seq"), **params)(q, k, v, bias,
                                                                            *((key_bias,) if has_key_bias else ()),
                                                                            do, lse2, delta)
    return dq, dk, dv, dbias


@functools.partial(jax.jit, static_argnames=("causal", "scale", "block_q", "block_kv", "stages", "bias_grad",
                                             "interpret", "fused"))
def _backward(q, k, v, bias, out, lse2, dout, key_bias=None, *, causal, scale, block_q, block_kv, stages, bias_grad,
              interpret, fused=False):
    q_len, kv_len = q.shape[1], k.shape[1]
    q_p, k_p, v_p, bias_p, kb_p = _padded_inputs(q, k, v, bias, key_bias, causal=causal, block_q=block_q,
                                                 block_kv=block_kv, kv_tile=_COMPUTE_WGS * block_kv)
    extra = q_p.shape[1] - q_len
    do_p = _pad_to(dout.astype(q.dtype), 1, q_p.shape[1])
    delta = jnp.einsum("bqhd,bqhd->bhq", out.astype(jnp.float32), dout.astype(jnp.float32))
    delta = jnp.pad(delta, ((0, 0), (0, 0), (0, extra)))
    # Padded query rows: dO = 0 and delta = 0, so their dS is 0; any finite lse will do.
    lse_p = jnp.pad(lse2, ((0, 0), (0, 0), (0, extra)))
    dq, dk, dv, dbias = _bwd_kernels(q_p, k_p, v_p, bias_p, do_p, lse_p, delta, causal=causal, scale=scale,
                                     kv_len=kv_len, block_q=block_q, block_kv=block_kv, stages=stages,
                                     bias_grad=bias_grad and bias is not None, interpret=interpret, key_bias=kb_p,
                                     fused=fused)
    if dbias is not None:  # back to the bias's own shape: sum what was broadcast
        dbias = dbias[:, :, :q_len, :kv_len].astype(jnp.float32)
        shape4 = (1,) * (4 - bias.ndim) + tuple(bias.shape)
        dbias = jnp.sum(dbias, axis=tuple(a for a in (2, 3) if shape4[a] == 1), keepdims=True)
        dbias = dbias.reshape(bias.shape).astype(bias.dtype)
    return dq[:, :q_len], dk[:, :kv_len], dv[:, :kv_len], dbias


def _fits(q, bias, key_bias, stages, block_q, block_kv, bias_grad=True):
    return fused_fits(q.shape[-1], jnp.dtype(q.dtype).itemsize, has_bias=bias is not None,
                      has_key_bias=key_bias is not None, stages=stages, bias_grad=bias_grad, block_q=block_q,
                      block_kv=block_kv)


def _backward_config(q, k, v, bias, out, lse2, dout, causal, scale, block_q, block_kv, bias_grad, interpret,
                     tuner=None, key_bias=None):
    """(stages, fused) for the backward kernels on inputs shaped like these."""
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)

    def make_run(config):
        args = [_concrete(x.shape, x.dtype, i) for i, x in enumerate((q, k, v))]
        b = None if bias is None else _concrete(bias.shape, q.dtype, 3)
        kb = None if key_bias is None else jnp.zeros(key_bias.shape, jnp.float32)
        o, l2 = _forward(*args, b, kb, causal=causal, scale=scale, block_q=block_q, block_kv=64, stages=2,
                         interpret=interpret)
        do = _concrete(dout.shape, q.dtype, 4)
        return lambda: _backward(*args, b, o, l2, do, kb, causal=causal, scale=scale, block_q=block_q,
                                 block_kv=block_kv, stages=config[0], bias_grad=bias_grad and b is not None,
                                 interpret=interpret, fused=config[1])

    candidates = tuple(c for c in bwd_candidates(bias is not None)
                       if not c[1] or _fits(q, bias, key_bias, c[0], block_q, block_kv, bias_grad))
    return _tuned("bwd", q, k, bias, causal, candidates, make_run, interpret=interpret, tuner=tuner,
                  key_bias=key_bias)


def flash_attention_sm90_bwd(q, k, v, out, lse2, dout, *, bias=None, key_bias=None, causal=False, scale=None,
                             block_q=64, block_kv=64, stages=None, bias_grad=True, fused=None, interpret=False):
    """Gradients of ``flash_attention_sm90`` on an sm90 GPU: (dq, dk, dv, dbias).

    ``out`` and ``lse2`` come from ``flash_attention_sm90(..., return_lse=True)`` on the same
    inputs (``key_bias`` too: it gets no gradient); ``dout`` is the output's cotangent. dq, dk, dv
    in the inputs' dtypes; dbias in the bias's shape and dtype (None without a bias or with
    ``bias_grad=False``), summed over what the bias broadcast. ``fused=True`` forms dQ (and dbias)
    inside the dK/dV kernel with float32 TMA reduce-adds instead of in kernels of their own (5 tile
    products instead of 7, or 9 with a bias gradient; see the module docstring; a ValueError where
    its shared memory does not fit, ``fused_fits``).
    ``stages`` and ``fused`` left None are the measured best on an sm90 GPU (``sm90_tuning``), else
    the default (``BWD_CANDIDATES``: unfused, 3 stages without a bias, 2 with one; fused: 2).
    ``interpret=True`` runs the kernels in jax's Mosaic GPU interpreter.
    """
    check_sm90_inputs(q, k, v, bias, causal, key_bias)
    if out.shape != q.shape or dout.shape != q.shape or lse2.shape != (q.shape[0], q.shape[2], q.shape[1]):
        raise ValueError(f"out {out.shape} and dout {dout.shape} must be q's shape {q.shape}, lse2 {lse2.shape} "
                         f"[batch, heads, q_len]")
    if stages is None and fused is None and not interpret:
        stages, fused = _backward_config(q, k, v, bias, out, lse2, dout, bool(causal), scale, block_q, block_kv,
                                         bias_grad, False, key_bias=key_bias)
    fused = bool(fused)
    if stages is None:
        stages = FUSED_CANDIDATES[0][0] if fused else BWD_CANDIDATES[bias is not None][0][0]
    _check_blocks(block_q, block_kv, stages)
    if fused and not _fits(q, bias, key_bias, stages, block_q, block_kv, bias_grad):
        raise ValueError(f"the fused sm90 backward does not fit shared memory at head_dim {q.shape[-1]}, "
                         f"stages={stages}{' with a bias' if bias is not None else ''}; use fused=False")
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    return _backward(q, k, v, bias, out, lse2, dout, key_bias, causal=bool(causal), scale=scale, block_q=block_q,
                     block_kv=block_kv, stages=stages, bias_grad=bool(bias_grad), interpret=bool(interpret),
                     fused=fused)
