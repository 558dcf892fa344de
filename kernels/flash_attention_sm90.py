"""Flash attention for Hopper GPUs (sm90) in Pallas Mosaic GPU, forward and backward, with an
additive bias and its gradient.

Forward, FlashAttention-3's layout (Shah et al. 2024): each CTA owns two query tiles, one per
consumer warpgroup, and a third (producer) warpgroup streams K, V and the bias tiles through a
ring of shared-memory stages with TMA copies completing on barriers. The consumers run QK^T
and PV on ``wgmma`` with float32 accumulators, an online softmax in base 2, and ping-pong on a
shared barrier so one warpgroup's softmax overlaps the other's matrix work. Causal attention
skips the key tiles past each query tile and masks only the diagonal ones; a bias of any
shape broadcastable to [batch, heads, q_len, kv_len] is added to the scaled logits, and so is a
key bias [batch or 1, kv_len] (a key-padding mask as 0 / large negative: one float per key,
streamed with each key tile, so a mask never becomes a [Q, K] bias); any sequence length works
(padded inside, padded keys masked). head_dim 32, 64, 96 or 128: shared-memory tiles are
swizzled to the widest span their rows fill. It can return each row's base-2 log-sum-exp.

Backward (``flash_attention_sm90_bwd``, from that log-sum-exp): dK/dV, dQ and dbias kernels of
the same producer/consumer shape, described above ``_bwd_kernels``. The front-door adapter
(``sciscale_jax.attention.sm90``) joins the two in a custom VJP.

``interpret=True`` runs every kernel in jax's Mosaic GPU interpreter on any host (``_Ops``:
products there are float32 dots); the tests use it on the CPU.

Written after jax's ``jax/experimental/pallas/ops/gpu/attention_mgpu.py`` (which has no bias,
no softmax scale and no causal backward), for jax >= 0.10 (the interpreter) and an sm90 GPU.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax

_LOG2E = math.log2(math.e)
_COMPUTE_WGS = 2
SM90_DTYPES = ("bfloat16", "float16")
SM90_HEAD_DIMS = (32, 64, 96, 128)
# Head dims whose compiled kernels passed the GPU tests on an H200 (64 and 128:
# benchmarks/results/gpu_session_h200_sm90.md; 32, the Evoformer's, and 96:
# gpu_check_h200_2026-11-30.log, 18 passed); the front door's "auto" picks sm90 only at these. A
# head dim added to SM90_HEAD_DIMS is taken with impl="sm90" until a GPU run of
# tests/test_flash_sm90.py -m gpu adds it here.
SM90_GPU_TESTED_HEAD_DIMS = (32, 64, 96, 128)


def _mosaic_gpu():
    """(pl, plgpu), or raise ImportError where Pallas Mosaic GPU is missing."""
    import jax.experimental.pallas as pl
    import jax.experimental.pallas.mosaic_gpu as plgpu
    return pl, plgpu


def sm90_supported() -> bool:
    """True on a CUDA GPU of compute capability 9.x with Pallas Mosaic GPU importable."""
    try:
        devices = jax.devices("gpu")
        capability = float(getattr(devices[0], "compute_capability", 0)) if devices else 0.0
        _mosaic_gpu()
    except Exception:  # noqa: BLE001 - no GPU backend, ROCm, or an old jax
        return False
    return 9.0 <= capability < 10.0


def check_sm90_inputs(q, k, v, bias=None, causal=False, key_bias=None) -> None:
    """Raise a ValueError naming the values the kernel cannot take (before any compilation)."""
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise ValueError(f"q, k, v must be [batch, seq, heads, head_dim]; got {q.shape}, {k.shape}, {v.shape}")
    if k.shape != v.shape or q.shape[0] != k.shape[0] or q.shape[3] != k.shape[3]:
        raise ValueError(f"q {q.shape}, k {k.shape}, v {v.shape} do not fit [B, Q, H, D], [B, K, Hkv, D]")
    dtype = jnp.dtype(q.dtype).name
    if dtype not in SM90_DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"the sm90 kernel takes q, k, v all {' or '.join(SM90_DTYPES)}; got "
                         f"{q.dtype}, {k.dtype}, {v.dtype}")
    if q.shape[3] not in SM90_HEAD_DIMS:
        raise ValueError(f"the sm90 kernel takes head_dim in {SM90_HEAD_DIMS}; got {q.shape[3]}")
    if q.shape[2] % k.shape[2]:
        raise ValueError(f"kv_heads={k.shape[2]} does not divide heads={q.shape[2]}")
    if causal and q.shape[1] != k.shape[1]:
        raise ValueError(f"causal sm90 attention needs q_len == kv_len; got {q.shape[1]} and {k.shape[1]}")
    if bias is not None:
        target = (q.shape[0], q.shape[2], q.shape[1], k.shape[1])
        if bias.ndim > 4 or any(b not in (1, t) for b, t in zip(bias.shape[::-1], target[::-1])):
            raise ValueError(f"bias of shape {tuple(bias.shape)} does not broadcast to "
                             f"[batch, heads, q_len, kv_len] = {target}")
    if key_bias is not None:
        if (key_bias.ndim != 2 or key_bias.shape[0] not in (1, q.shape[0]) or key_bias.shape[1] not in (1, k.shape[1])
                or not jnp.issubdtype(key_bias.dtype, jnp.floating)):
            raise ValueError(f"key_bias must be floating [batch or 1, kv_len or 1] = [{q.shape[0]}, {k.shape[1]}]; "
                             f"got {jnp.dtype(key_bias.dtype).name} {tuple(key_bias.shape)}")


class _Ops:
    """The few kernel operations GPU interpret mode cannot run, with a plain form for it.

    jax's Mosaic GPU interpreter (``interpret=InterpretGPUParams()``, CPU) simulates shared
    memory, TMA copies, barriers and the warpgroups as threads, but not register layouts,
    transposed shared-memory operands, ``wgmma`` with a register operand or ``pl.run_state``.
    Interpreting, matrix products load their operands and use ``jnp.dot`` (float32
    accumulation); everything else in the kernels (the copies, the barrier protocol, the
    slots, the masks, the softmax, the padding) is the code the GPU runs.
    """

    def __init__(self, interpret: bool):
        self.interpret = interpret
        self.pl, self.plgpu = _mosaic_gpu()

    def layout(self, x, layout):
        return x if self.interpret else self.plgpu.layout_cast(x, layout)

    def iota(self, shape, dim):
        if self.interpret:
            return lax.broadcasted_iota(jnp.int32, shape, dim)
        return self.plgpu.broadcasted_iota(jnp.int32, shape, dim, layout=self.plgpu.Layout.WGMMA)

    def rows(self, ref, layout):
        """A vector from shared memory, laid out to broadcast against a WGMMA tile."""
        if self.interpret:
            return ref[...]
        if _LOAD_TAKES_INDEX:  # jax 0.10; from 0.11 the index is optional and passing one deprecated
            return self.plgpu.load(ref, (), layout=layout)
        return self.plgpu.load(ref, layout=layout)

    def mma(self, acc, a, b, *, transpose_b=False, during=None):
        """acc + a @ b (b transposed if asked) in float32; acc None starts from zero. a is a
        shared-memory ref or a register array; b a shared-memory ref. ``during`` runs while the
        product is in flight (before its result is awaited)."""
        pl, plgpu = self.pl, self.plgpu
        if self.interpret:
            a_val = a if isinstance(a, jax.Array) else a[...]
            b_val = b[...]
            out = jnp.dot(a_val, b_val.T if transpose_b else b_val, preferred_element_type=jnp.float32)
            if during is not None:
                during()
            return out if acc is None else acc + out
        rhs = b.transpose((1, 0)) if transpose_b else b
        if acc is None:
            shape = (a.shape[0], rhs.shape[1])

            def product(acc_ref):
                plgpu.wgmma(acc_ref, a, rhs)
                if during is not None:
                    during()
                return acc_ref[...]

            return pl.run_scoped(product, plgpu.ACC(shape, jnp.float32))

        def accumulate(acc_ref):
            plgpu.wgmma(acc_ref, a, rhs)
            if during is not None:
                during()

        return pl.run_state(accumulate)(plgpu.ACC.init(acc))


def _load_takes_index() -> bool:
    try:
        import inspect
        _, plgpu = _mosaic_gpu()
        return inspect.signature(plgpu.load).parameters["idx"].default is inspect.Parameter.empty
    except Exception:  # noqa: BLE001 - no Mosaic GPU: never called
        return True


_LOAD_TAKES_INDEX = _load_takes_index()


def _interpret_params(interpret: bool):
    if not interpret:
        return None
    from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams  # no public path yet
    return InterpretGPUParams()


def _tiled(plgpu, dtype, minor: int):
    """Tiling and swizzle of a shared-memory tile whose rows hold ``minor`` elements and that
    ``wgmma`` reads: the widest swizzle (128, 64 or 32 bytes) the row fills, in tiles of 8 rows x
    one swizzle span (head_dim 32 in 16 bits: 64-byte rows, so a 64-byte swizzle)."""
    itemsize = jnp.dtype(dtype).itemsize
    swizzle = next(s for s in (128, 64, 32) if (minor * itemsize) % s == 0)
    return plgpu.TilingTransform((8, swizzle // itemsize)), plgpu.SwizzleTransform(swizzle)


def _bias_block(bias_ref, b, h, rows, cols):
    """The [rows, cols] block of the bias for batch row b and head h (index 0 on a broadcast axis)."""
    return bias_ref.at[b if bias_ref.shape[0] > 1 else 0, h if bias_ref.shape[1] > 1 else 0, rows, cols]


def _key_bias_block(kb_ref, b, cols):
    """The key bias's ``cols`` for batch row b (row 0 where it broadcasts over the batch)."""
    return kb_ref.at[b if kb_ref.shape[0] > 1 else 0, cols]


def _plus_key_bias(ops, s, kb_smem, key_axis):
    """The logit tile s (base 2) plus the key bias of its keys, which run along ``key_axis``."""
    layout = ops.plgpu.Layout.WGMMA.reduce(1 - key_axis)
    return s + lax.broadcast_in_dim(ops.rows(kb_smem, layout) * _LOG2E, s.shape, [key_axis])


def _pad_to(x, axis, multiple):
    size = x.shape[axis]
    extra = -size % multiple
    if not extra:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, extra)
    return jnp.pad(x, widths)


def _kernel_call(q, k, v, bias, key_bias=None, *, causal, scale, kv_len, block_q, block_kv, stages,
                 interpret=False):
    """The forward kernel on padded inputs: q [B, Qp, H, D], k/v [B, Kp, Hkv, D], bias None or
    [Bb, Hb, Qp, Kp] in q's dtype, key_bias None or [Bk, Kp] float32; Qp % (2 block_q) == 0,
    Kp % block_kv == 0. Returns the output [B, Qp, H, D] and the base-2 log-sum-exp of the scaled
    logits [B, H, Qp] (float32)."""
    pl, plgpu = _mosaic_gpu()
    ops = _Ops(interpret)
    batch, q_pad, heads, head_dim = q.shape
    k_pad, kv_heads = k.shape[1], k.shape[2]
    group = heads // kv_heads
    dtype = q.dtype
    total_kv_steps = k_pad // block_kv
    stages = min(stages, total_kv_steps)
    mask_padded_keys = kv_len < k_pad and not causal  # causal masks them already (q_len == kv_len)
    has_bias, has_key_bias = bias is not None, key_bias is not None
    logit_scale = scale * _LOG2E  # logits in base 2: exp2(x log2 e) = exp(x)
    wgmma_layout = plgpu.Layout.WGMMA
    row_layout = plgpu.Layout.WGMMA.reduce(1)

    def body(q_ref, k_ref, v_ref, bias_ref, kb_ref, out_ref, lse_ref, smem, produced, consumed, schedule_barrier):
        q_head = lax.axis_index("heads")
        b = lax.axis_index("batch")
        wg = lax.axis_index("wg")
        q_tile = lax.axis_index("q_seq")
        qo_smem2, k_smem, v_smem, bias_smem, kb_smem, lse_smem2 = smem
        k_ready, v_ready, q_ready = produced
        k_free, v_free = consumed
        cta_q_base = q_tile * (_COMPUTE_WGS * block_q)

        def schedule():  # ping-pong: wait for the other consumer's turn on the tensor cores
            plgpu.barrier_arrive(schedule_barrier)
            plgpu.barrier_wait(schedule_barrier)

        if causal:  # key tiles this CTA needs: up to its last query row
            cta_kv_steps = pl.cdiv(cta_q_base + _COMPUTE_WGS * block_q, jnp.array(block_kv, jnp.int32))
        else:
            cta_kv_steps = total_kv_steps

        @pl.when(wg < _COMPUTE_WGS)
        def _consumer():
            plgpu.set_max_registers(232, action="increase")
            qo_smem = qo_smem2.at[wg]
            q_base = cta_q_base + wg * block_q
            kv_steps = pl.cdiv(q_base + block_q, jnp.array(block_kv, jnp.int32)) if causal else cta_kv_steps
            plgpu.copy_gmem_to_smem(q_ref.at[b, pl.ds(q_base, block_q), q_head], qo_smem, q_ready.at[wg])
            plgpu.barrier_wait(q_ready.at[wg])
            m_i = ops.layout(jnp.full((block_q,), -jnp.inf, jnp.float32), row_layout)
            l_i = ops.layout(jnp.full((block_q,), 0.0, jnp.float32), row_layout)
            acc = ops.layout(jnp.full((block_q, head_dim), 0.0, jnp.float32), wgmma_layout)

            @pl.when(kv_steps > 0)
            def _():
                plgpu.barrier_wait(k_ready.at[0])

            pl.when(wg == 1)(schedule)

            def kv_step(step, carry, diagonal=False):
                acc, m_i, l_i = carry
                slot = lax.rem(step, jnp.array(stages, step.dtype))
                s = ops.mma(None, qo_smem, k_smem.at[slot], transpose_b=True, during=schedule) * logit_scale
                if has_bias:
                    tile = bias_smem[slot, pl.ds(wg * block_q, block_q)]
                    s = s + tile.astype(jnp.float32) * _LOG2E
                if has_key_bias:
                    s = _plus_key_bias(ops, s, kb_smem.at[slot], 1)
                if has_bias or has_key_bias:
                    plgpu.commit_smem()  # the bias reads complete before the producer's next TMA write
                plgpu.barrier_arrive(k_free.at[slot])
                if diagonal or mask_padded_keys:
                    cols = ops.iota((block_q, block_kv), 1) + step * block_kv
                    keep = cols < kv_len
                    if diagonal:
                        keep = (ops.iota((block_q, block_kv), 0) + q_base) >= cols
                    s = jnp.where(keep, s, -jnp.inf)
                m_new = jnp.maximum(m_i, s.max(axis=1))
                alpha = jnp.exp2(m_i - m_new)
                p = jnp.exp2(s - lax.broadcast_in_dim(m_new, s.shape, [0]))
                acc = acc * lax.broadcast_in_dim(alpha, acc.shape, [0])
                l_i = l_i * alpha + p.sum(axis=1)
                p16 = p.astype(dtype)
                acc, l_i, m_new, p16 = lax.optimization_barrier((acc, l_i, m_new, p16))
                plgpu.barrier_arrive(schedule_barrier)   # softmax done
                plgpu.barrier_wait(v_ready.at[slot])
                plgpu.barrier_wait(schedule_barrier)     # tensor cores free

                def wait_next_k():  # overlaps the wait for the next K tile with the product
                    nxt = step + 1

                    @pl.when(nxt < kv_steps)
                    def _():
                        plgpu.barrier_wait(k_ready.at[lax.rem(nxt, jnp.array(stages, nxt.dtype))])

                acc = ops.mma(acc, p16, v_smem.at[slot], during=wait_next_k)
                plgpu.barrier_arrive(v_free.at[slot])
                return acc, m_new, l_i

            carry = (acc, m_i, l_i)
            if not causal:
                acc, m_i, l_i = lax.fori_loop(0, kv_steps, kv_step, carry)
            else:
                full_steps = lax.div(q_base, jnp.array(block_kv, jnp.int32))  # tiles left of the diagonal
                carry = lax.fori_loop(0, full_steps, kv_step, carry)
                acc, m_i, l_i = lax.fori_loop(full_steps, kv_steps, functools.partial(kv_step, diagonal=True),
                                              carry)

                def drain(step, _):  # release the tiles the producer loaded for the other consumer
                    slot = lax.rem(step, jnp.array(stages, step.dtype))
                    plgpu.barrier_wait(k_ready.at[slot])  # every phase observed: the slots stay in step
                    plgpu.barrier_arrive(k_free.at[slot])
                    plgpu.barrier_wait(v_ready.at[slot])
                    plgpu.barrier_arrive(v_free.at[slot])
                    schedule()
                    schedule()

                lax.fori_loop(kv_steps, cta_kv_steps, drain, None)
            pl.when(wg == 0)(schedule)

            out = acc / lax.broadcast_in_dim(l_i, (block_q, head_dim), [0])
            qo_smem[...] = out.astype(dtype)
            lse_smem = lse_smem2.at[wg]
            lse_smem[...] = m_i + jnp.log2(l_i)
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(qo_smem, out_ref.at[b, pl.ds(q_base, block_q), q_head])
            plgpu.copy_smem_to_gmem(lse_smem, lse_ref.at[b, q_head, pl.ds(q_base, block_q)])
            plgpu.wait_smem_to_gmem(0)

        @pl.when(wg == _COMPUTE_WGS)
        def _producer():
            plgpu.set_max_registers(40, action="decrease")
            kv_head = lax.div(q_head, jnp.array(group, q_head.dtype))

            def load(step, slot):
                rows = (b, pl.ds(step * block_kv, block_kv), kv_head)
                plgpu.copy_gmem_to_smem(k_ref.at[rows], k_smem.at[slot], k_ready.at[slot])
                if has_bias:
                    tile = _bias_block(bias_ref, b, q_head, pl.ds(cta_q_base, _COMPUTE_WGS * block_q),
                                       pl.ds(step * block_kv, block_kv))
                    plgpu.copy_gmem_to_smem(tile, bias_smem.at[slot], k_ready.at[slot])
                if has_key_bias:
                    plgpu.copy_gmem_to_smem(_key_bias_block(kb_ref, b, pl.ds(step * block_kv, block_kv)),
                                            kb_smem.at[slot], k_ready.at[slot])
                plgpu.copy_gmem_to_smem(v_ref.at[rows], v_smem.at[slot], v_ready.at[slot])

            def released(step):  # wait until both consumers are done with this step's slot
                slot = lax.rem(step, jnp.array(stages, step.dtype))
                plgpu.barrier_wait(k_free.at[slot])   # K (and bias) slot
                plgpu.barrier_wait(v_free.at[slot])
                return slot

            for i in range(stages):
                pl.when(i < cta_kv_steps)(functools.partial(load, jnp.int32(i), i))

            @pl.loop(0, cta_kv_steps - stages)
            def _(i):
                load(i + stages, released(i))

            @pl.loop(jnp.maximum(cta_kv_steps - stages, 0), cta_kv_steps)
            def _(i):  # the last releases, so every barrier phase is awaited (the interpreter checks)
                released(i)

    tiled = _tiled(plgpu, dtype, head_dim)

    def entry(q_ref, k_ref, v_ref, *rest):
        rest = list(rest)
        bias_ref = rest.pop(0) if has_bias else None
        kb_ref = rest.pop(0) if has_key_bias else None
        out_ref, lse_ref = rest
        scratch = [
            plgpu.SMEM((_COMPUTE_WGS, block_q, head_dim), dtype, transforms=tiled),
            plgpu.SMEM((stages, block_kv, head_dim), dtype, transforms=tiled),
            plgpu.SMEM((stages, block_kv, head_dim), dtype, transforms=tiled),
            plgpu.SMEM((stages, _COMPUTE_WGS * block_q, block_kv), dtype, transforms=_tiled(plgpu, dtype, block_kv))
            if has_bias else None,
            plgpu.SMEM((stages, block_kv), jnp.float32) if has_key_bias else None,
            plgpu.SMEM((_COMPUTE_WGS, block_q), jnp.float32),
        ]
        k_arrivals = 1 + has_bias + has_key_bias  # the K copy, the bias and key-bias copies
        pl.run_scoped(
            lambda smem, produced, consumed, schedule_barrier: body(
                q_ref, k_ref, v_ref, bias_ref, kb_ref, out_ref, lse_ref, smem, produced, consumed,
                schedule_barrier),
            scratch,
            (plgpu.Barrier(num_arrivals=k_arrivals, num_barriers=stages),
             plgpu.Barrier(num_barriers=stages),
             plgpu.Barrier(num_barriers=_COMPUTE_WGS)),
            (plgpu.Barrier(num_arrivals=_COMPUTE_WGS, num_barriers=stages),) * 2,
            plgpu.Barrier(num_arrivals=_COMPUTE_WGS),
            collective_axes="wg",
        )

    operands = (q, k, v) + ((bias,) if has_bias else ()) + ((key_bias,) if has_key_bias else ())
    return plgpu.kernel(
        entry,
        out_type=(jax.ShapeDtypeStruct(q.shape, dtype), jax.ShapeDtypeStruct((batch, heads, q_pad), jnp.float32)),
        grid=(heads, q_pad // (_COMPUTE_WGS * block_q), batch),
        grid_names=("heads", "q_seq", "batch"),
        num_threads=_COMPUTE_WGS + 1,
        thread_name="wg",
        compiler_params=plgpu.CompilerParams(approx_math=True),
        interpret=_interpret_params(interpret),
    )(*operands)


def _padded_inputs(q, k, v, bias, key_bias, *, causal, block_q, block_kv, kv_tile=None):
    """q, k, v padded along the sequences to whole CTA tiles (``kv_tile`` keys: the backward's dK/dV
    CTA owns 2 x block_kv), the bias as [Bb, Hb, Qp, Kp] in q's dtype (Bb, Hb: 1 where it
    broadcasts) and the key bias as [Bk, Kp] float32, zero-padded."""
    q_len, kv_len = q.shape[1], k.shape[1]
    tile_q, kv_tile = _COMPUTE_WGS * block_q, kv_tile or block_kv
    # Causal attention pads both sequences to one length so the diagonal stays where it is.
    kv_multiple = math.lcm(tile_q, kv_tile) if causal else kv_tile
    q_p = _pad_to(q, 1, kv_multiple if causal else tile_q)
    k_p, v_p = _pad_to(k, 1, kv_multiple), _pad_to(v, 1, kv_multiple)
    bias_p = None
    if bias is not None:
        bias4 = bias.reshape((1,) * (4 - bias.ndim) + tuple(bias.shape))
        bias4 = jnp.broadcast_to(bias4, bias4.shape[:2] + (q_len, kv_len)).astype(q.dtype)
        bias_p = _pad_to(_pad_to(bias4, 2, q_p.shape[1]), 3, k_p.shape[1])
    kb_p = None
    if key_bias is not None:
        kb_p = _pad_to(jnp.broadcast_to(key_bias.astype(jnp.float32), (key_bias.shape[0], kv_len)), 1, k_p.shape[1])
    return q_p, k_p, v_p, bias_p, kb_p


@functools.partial(jax.jit, static_argnames=("causal", "scale", "block_q", "block_kv", "stages", "interpret"))
def _forward(q, k, v, bias, key_bias=None, *, causal, scale, block_q, block_kv, stages, interpret):
    q_len, kv_len = q.shape[1], k.shape[1]
    q_p, k_p, v_p, bias_p, kb_p = _padded_inputs(q, k, v, bias, key_bias, causal=causal, block_q=block_q,
                                                 block_kv=block_kv)
    out, lse2 = _kernel_call(q_p, k_p, v_p, bias_p, kb_p, causal=causal, scale=scale, kv_len=kv_len,
                             block_q=block_q, block_kv=block_kv, stages=stages, interpret=interpret)
    return out[:, :q_len], lse2[:, :, :q_len]


def _check_blocks(block_q, block_kv, stages):
    if block_q % 64:
        raise ValueError(f"block_q={block_q} must be a multiple of 64")
    if block_kv % 64 or stages < 2:
        raise ValueError(f"block_kv={block_kv} must be a multiple of 64 and stages={stages} at least 2")


# Configurations the tuner measures (``kernels/sm90_tuning.py``), keyed by whether there is a bias;
# the first is the default where tuning is off or not on an sm90 GPU: the tuner's pick on an H200
# at head_dim 128, seq 4096 (benchmarks/results/sm90_tuning_h200.json). Forward: (block_kv, stages)
# with 2 x 64 query rows per CTA (a bias ring takes shared memory, so smaller key tiles with it);
# backward: stages at 64 x 64 (3 stages of the bias ring do not fit at head_dim 128).
FWD_CANDIDATES = {False: ((128, 2), (128, 3), (64, 2), (64, 4)), True: ((64, 2), (64, 3), (64, 4), (128, 2))}
BWD_CANDIDATES = {False: ((3,), (2,)), True: ((2,), (3,))}


def _concrete(shape, dtype, seed):
    import numpy as np
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), dtype)


def _tuned(pass_name, q, k, bias, causal, candidates, make_run, *, interpret, tuner=None):
    """The tuner's choice among ``candidates`` for this shape class (measured now if new), or the
    first candidate where tuning is off or there is no sm90 GPU (and not interpreting)."""
    from sciscale_jax.kernels import sm90_tuning
    tuner = tuner if tuner is not None else sm90_tuning.default_tuner()
    if tuner is None or not (interpret or sm90_supported()):
        return candidates[0]
    kind = "interpret" if interpret else jax.devices("gpu")[0].device_kind
    key = sm90_tuning.shape_key(kind, pass_name, q.shape[-1], q.dtype, causal, bias is not None, q.shape[1],
                                k.shape[1])
    # Measured on a thread of its own: jax's trace state is per thread, so the candidates run as
    # plain computations even while the caller is being traced.
    import concurrent.futures
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        best = pool.submit(tuner.best, key, candidates, make_run).result()
    return candidates[0] if best is None else best


def _forward_config(q, k, v, bias, causal, scale, block_q, interpret, tuner=None, key_bias=None):
    """(block_kv, stages) for the forward kernel on inputs shaped like these."""
    def make_run(config):
        args = [_concrete(x.shape, x.dtype, i) for i, x in enumerate((q, k, v))]
        b = None if bias is None else _concrete(bias.shape, q.dtype, 3)
        kb = None if key_bias is None else jnp.zeros(key_bias.shape, jnp.float32)
        return lambda: _forward(*args, b, kb, causal=causal, scale=scale, block_q=block_q, block_kv=config[0],
                                stages=config[1], interpret=interpret)

    return _tuned("fwd", q, k, bias, causal, FWD_CANDIDATES[bias is not None], make_run, interpret=interpret,
                  tuner=tuner)


def flash_attention_sm90(q, k, v, *, bias=None, key_bias=None, causal=False, scale=None, block_q=64, block_kv=None,
                         stages=None, return_lse=False, interpret=False):
    """softmax(q k^T * scale + bias) v on an sm90 GPU, forward only.

    q [batch, q_len, heads, head_dim]; k, v [batch, kv_len, kv_heads, head_dim] (kv_heads
    divides heads); bias broadcastable to [batch, heads, q_len, kv_len], cast to q's dtype;
    key_bias [batch or 1, kv_len] added to every query's logits in float32, without a gradient (a
    key-padding mask as 0 / large negative, read per key tile instead of as a [Q, K] bias); causal
    is start-aligned and needs q_len == kv_len. bf16/fp16 inputs, head_dim 32, 64, 96 or 128;
    float32 accumulation. Returns [batch, q_len, heads, head_dim] in q's dtype, and with
    ``return_lse`` also the log-sum-exp of each row's logits in base 2, [batch, heads, q_len]
    float32 (what ``flash_attention_sm90_bwd`` takes). ``block_kv`` and ``stages`` left None are
    the measured best for this shape class on an sm90 GPU (``sm90_tuning``), else the defaults.
    ``interpret=True`` runs the kernel in jax's Mosaic GPU interpreter on any host (slow; tests).
    """
    check_sm90_inputs(q, k, v, bias, causal, key_bias)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    if block_kv is None and stages is None and not interpret:
        block_kv, stages = _forward_config(q, k, v, bias, bool(causal), scale, block_q, False, key_bias=key_bias)
    default_kv, default_stages = FWD_CANDIDATES[bias is not None][0]
    block_kv = default_kv if block_kv is None else block_kv
    stages = default_stages if stages is None else stages
    _check_blocks(block_q, block_kv, stages)
    out, lse2 = _forward(q, k, v, bias, key_bias, causal=bool(causal), scale=scale, block_q=block_q,
                         block_kv=block_kv, stages=stages, interpret=bool(interpret))
    return (out, lse2) if return_lse else out


# ---- backward ------------------------------------------------------------------------------------
#
# Three kernels after FlashAttention-2's backward (Dao 2023), each with the forward's structure:
# a producer warpgroup streams tiles through a ring of ``stages`` shared-memory slots (TMA copies
# completing on one "ready" barrier per slot, freed by both consumers on a "free" barrier), and two
# consumer warpgroups own 64 rows each of what stays resident.
#   dK/dV: a CTA owns 2 x block_kv keys of one kv head and streams (Q, dO, lse, delta) tiles of
#          every query head of its GQA group, accumulating dK and dV in registers (no atomics;
#          causal: only the query tiles at or below its keys).
#   dQ:    a CTA owns 2 x block_q queries of one head and streams (K, V) tiles.
#   dbias: a CTA owns one [2 x block_q, block_kv] tile of the bias as given (before broadcasting)
#          and streams the (Q, dO, lse, delta, K, V) tiles of every batch row and head the bias
#          broadcasts over, summing dS in registers: the bias gradient in the bias's own shape
#          without an [B, H, Q, K] intermediate or atomic adds (it recomputes QK^T and dO V^T once
#          more; a fused variant with TMA reduce-adds is left for measurement on a GPU).
# Probabilities come back from the forward's base-2 log-sum-exp; delta = rowsum(dO * O).


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
                 bias_grad, interpret, key_bias=None):
    """dq [B, Qp, H, D], dk, dv [B, Kp, Hkv, D] and dbias [Bb, Hb, Qp, Kp] (None unless bias_grad),
    all in q's dtype (dbias summed in float32 and rounded once), on padded inputs: q, do
    [B, Qp, H, D]; k, v [B, Kp, Hkv, D]; bias None or [Bb, Hb, Qp, Kp] in q's dtype; lse2, delta
    [B, H, Qp] float32; key_bias None or [Bk, Kp] float32 (no gradient)."""
    pl, plgpu = _mosaic_gpu()
    ops = _Ops(interpret)
    batch, q_pad, heads, head_dim = q.shape
    k_pad, kv_heads = k.shape[1], k.shape[2]
    group = heads // kv_heads
    dtype = q.dtype
    has_bias, has_key_bias = bias is not None, key_bias is not None
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
        do_ref, lse_ref, delta_ref, dk_ref, dv_ref = rest
        kv_head, b, wg = lax.axis_index("heads"), lax.axis_index("batch"), lax.axis_index("wg")
        cta_k = lax.axis_index("kv_seq") * (wgs * block_kv)
        first = lax.div(cta_k, jnp.array(block_q, jnp.int32)) if causal else jnp.int32(0)  # first query tile
        per_head = q_tiles - first
        n_steps = group * per_head

        def tile_of(i):  # step -> (query head, query tile)
            return kv_head * group + lax.div(i, per_head), first + lax.rem(i, per_head)

        def consumer(mine, ring, own_ready, ready, free):
            k_smem, v_smem, kb_smem = mine
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

            def step(i, carry):
                dk, dv = carry
                slot = lax.rem(i, jnp.array(stages, i.dtype))
                _, qt = tile_of(i)
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
                dk = ops.mma(dk, ds_t.astype(dtype), q_smem.at[slot])
                plgpu.commit_smem()  # the lse, delta (and bias) reads complete before the slot is refilled
                plgpu.barrier_arrive(free.at[slot])
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
                         smem(wgs, block_kv, dtype=jnp.float32) if has_key_bias else None),
                   ring=(smem(stages, block_q, head_dim), smem(stages, block_q, head_dim),
                         smem(stages, block_q, dtype=jnp.float32), smem(stages, block_q, dtype=jnp.float32),
                         smem(stages, wgs * block_kv, block_q) if has_bias else None),
                   own_arrivals=2 + has_key_bias, ring_arrivals=5 if has_bias else 4)

    kv_type = jax.ShapeDtypeStruct(k.shape, dtype)
    dk, dv = plgpu.kernel(dkv_entry, out_type=(kv_type, kv_type),
                          grid=(kv_heads, k_pad // (wgs * block_kv), batch), grid_names=("heads", "kv_seq", "batch"),
                          **params)(q, k, v, *((bias_t,) if has_bias else ()), *((key_bias,) if has_key_bias else ()),
                                    do, lse2, delta)
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
                                             "interpret"))
def _backward(q, k, v, bias, out, lse2, dout, key_bias=None, *, causal, scale, block_q, block_kv, stages, bias_grad,
              interpret):
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
                                     bias_grad=bias_grad and bias is not None, interpret=interpret, key_bias=kb_p)
    if dbias is not None:  # back to the bias's own shape: sum what was broadcast
        dbias = dbias[:, :, :q_len, :kv_len].astype(jnp.float32)
        shape4 = (1,) * (4 - bias.ndim) + tuple(bias.shape)
        dbias = jnp.sum(dbias, axis=tuple(a for a in (2, 3) if shape4[a] == 1), keepdims=True)
        dbias = dbias.reshape(bias.shape).astype(bias.dtype)
    return dq[:, :q_len], dk[:, :kv_len], dv[:, :kv_len], dbias


def _backward_config(q, k, v, bias, out, lse2, dout, causal, scale, block_q, block_kv, bias_grad, interpret,
                     tuner=None, key_bias=None):
    """(stages,) for the backward kernels on inputs shaped like these."""
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
                                 interpret=interpret)

    return _tuned("bwd", q, k, bias, causal, BWD_CANDIDATES[bias is not None], make_run, interpret=interpret,
                  tuner=tuner)


def flash_attention_sm90_bwd(q, k, v, out, lse2, dout, *, bias=None, key_bias=None, causal=False, scale=None,
                             block_q=64, block_kv=64, stages=None, bias_grad=True, interpret=False):
    """Gradients of ``flash_attention_sm90`` on an sm90 GPU: (dq, dk, dv, dbias).

    ``out`` and ``lse2`` come from ``flash_attention_sm90(..., return_lse=True)`` on the same
    inputs (``key_bias`` too: it gets no gradient); ``dout`` is the output's cotangent. dq, dk, dv
    in the inputs' dtypes; dbias in the bias's shape and dtype (None without a bias or with
    ``bias_grad=False``), summed over what the bias broadcast. ``stages`` left None is the measured best on an sm90 GPU (``sm90_tuning``),
    else the default (``BWD_CANDIDATES``: 3 without a bias, 2 with one). ``interpret=True`` runs
    the kernels in jax's Mosaic GPU interpreter.
    """
    check_sm90_inputs(q, k, v, bias, causal, key_bias)
    if stages is None and not interpret:
        stages = _backward_config(q, k, v, bias, out, lse2, dout, bool(causal), scale, block_q, block_kv, bias_grad,
                                  False, key_bias=key_bias)[0]
    stages = BWD_CANDIDATES[bias is not None][0][0] if stages is None else stages
    _check_blocks(block_q, block_kv, stages)
    if out.shape != q.shape or dout.shape != q.shape or lse2.shape != (q.shape[0], q.shape[2], q.shape[1]):
        raise ValueError(f"out {out.shape} and dout {dout.shape} must be q's shape {q.shape}, lse2 {lse2.shape} "
                         f"[batch, heads, q_len]")
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    return _backward(q, k, v, bias, out, lse2, dout, key_bias, causal=bool(causal), scale=scale, block_q=block_q,
                     block_kv=block_kv, stages=stages, bias_grad=bool(bias_grad), interpret=bool(interpret))
