"""Flash attention forward for Hopper GPUs (sm90) in Pallas Mosaic GPU, with an additive bias.

FlashAttention-3's forward layout (Shah et al. 2024): each CTA owns two query tiles, one per
consumer warpgroup, and a third (producer) warpgroup streams K, V and the bias tiles through a
ring of shared-memory stages with TMA copies completing on barriers. The consumers run QK^T
and PV on ``wgmma`` with float32 accumulators, an online softmax in base 2, and ping-pong on a
shared barrier so one warpgroup's softmax overlaps the other's matrix work. Causal attention
skips the key tiles past each query tile and masks only the diagonal ones; a bias of any
shape broadcastable to [batch, heads, q_len, kv_len] is added to the scaled logits; any
sequence length works (padded inside, padded keys masked).

Forward only: ``flash_attention_sm90`` has no VJP of its own. The front-door adapter
(``sciscale_jax.attention.sm90``) pairs it with a recomputing backward pass.

Written after jax's ``jax/experimental/pallas/ops/gpu/attention_mgpu.py`` (which has no bias
and no softmax scale), for jax >= 0.11 on an sm90 GPU.
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
SM90_HEAD_DIMS = (64, 128)


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


def check_sm90_inputs(q, k, v, bias=None, causal=False) -> None:
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
        rhs = plgpu.transpose_ref(b, (1, 0)) if transpose_b else b
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


def _interpret_params(interpret: bool):
    if not interpret:
        return None
    from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams  # no public path yet
    return InterpretGPUParams()


def _pad_to(x, axis, multiple):
    size = x.shape[axis]
    extra = -size % multiple
    if not extra:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, extra)
    return jnp.pad(x, widths)


def _kernel_call(q, k, v, bias, *, causal, scale, kv_len, block_q, block_kv, stages, interpret=False):
    """The forward kernel on padded inputs: q [B, Qp, H, D], k/v [B, Kp, Hkv, D], bias None or
    [Bb, Hb, Qp, Kp] in q's dtype; Qp % (2 block_q) == 0, Kp % block_kv == 0. Returns the output
    [B, Qp, H, D] and the base-2 log-sum-exp of the scaled logits [B, H, Qp] (float32)."""
    pl, plgpu = _mosaic_gpu()
    ops = _Ops(interpret)
    batch, q_pad, heads, head_dim = q.shape
    k_pad, kv_heads = k.shape[1], k.shape[2]
    group = heads // kv_heads
    dtype = q.dtype
    total_kv_steps = k_pad // block_kv
    stages = min(stages, total_kv_steps)
    mask_padded_keys = kv_len < k_pad and not causal  # causal masks them already (q_len == kv_len)
    has_bias = bias is not None
    logit_scale = scale * _LOG2E  # logits in base 2: exp2(x log2 e) = exp(x)
    wgmma_layout = plgpu.Layout.WGMMA
    row_layout = plgpu.Layout.WGMMA.reduce(1)

    def body(q_ref, k_ref, v_ref, bias_ref, out_ref, lse_ref, smem, produced, consumed, schedule_barrier):
        q_head = lax.axis_index("heads")
        b = lax.axis_index("batch")
        wg = lax.axis_index("wg")
        q_tile = lax.axis_index("q_seq")
        qo_smem2, k_smem, v_smem, bias_smem, lse_smem2 = smem
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
            bias_b = b if has_bias and bias_ref.shape[0] > 1 else 0
            bias_h = q_head if has_bias and bias_ref.shape[1] > 1 else 0

            def load(step, slot):
                rows = (b, pl.ds(step * block_kv, block_kv), kv_head)
                plgpu.copy_gmem_to_smem(k_ref.at[rows], k_smem.at[slot], k_ready.at[slot])
                if has_bias:
                    tile = (bias_b, bias_h, pl.ds(cta_q_base, _COMPUTE_WGS * block_q),
                            pl.ds(step * block_kv, block_kv))
                    plgpu.copy_gmem_to_smem(bias_ref.at[tile], bias_smem.at[slot], k_ready.at[slot])
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

    tiled = (plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128))

    def entry(q_ref, k_ref, v_ref, *rest):
        if has_bias:
            bias_ref, out_ref, lse_ref = rest
        else:
            bias_ref, (out_ref, lse_ref) = None, rest
        scratch = [
            plgpu.SMEM((_COMPUTE_WGS, block_q, head_dim), dtype, transforms=tiled),
            plgpu.SMEM((stages, block_kv, head_dim), dtype, transforms=tiled),
            plgpu.SMEM((stages, block_kv, head_dim), dtype, transforms=tiled),
            plgpu.SMEM((stages, _COMPUTE_WGS * block_q, block_kv), dtype, transforms=tiled) if has_bias else None,
            plgpu.SMEM((_COMPUTE_WGS, block_q), jnp.float32),
        ]
        k_arrivals = 2 if has_bias else 1  # the K copy and the bias copy
        pl.run_scoped(
            lambda smem, produced, consumed, schedule_barrier: body(
                q_ref, k_ref, v_ref, bias_ref, out_ref, lse_ref, smem, produced, consumed, schedule_barrier),
            scratch,
            (plgpu.Barrier(num_arrivals=k_arrivals, num_barriers=stages),
             plgpu.Barrier(num_barriers=stages),
             plgpu.Barrier(num_barriers=_COMPUTE_WGS)),
            (plgpu.Barrier(num_arrivals=_COMPUTE_WGS, num_barriers=stages),) * 2,
            plgpu.Barrier(num_arrivals=_COMPUTE_WGS),
            collective_axes="wg",
        )

    operands = (q, k, v) + ((bias,) if has_bias else ())
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


def _padded_inputs(q, k, v, bias, *, causal, block_q, block_kv):
    """q, k, v padded along the sequences to whole CTA tiles, and the bias as [Bb, Hb, Qp, Kp] in
    q's dtype (Bb, Hb: 1 where it broadcasts), zero-padded."""
    q_len, kv_len = q.shape[1], k.shape[1]
    tile_q = _COMPUTE_WGS * block_q
    # Causal attention pads both sequences to one length so the diagonal stays where it is.
    kv_multiple = math.lcm(tile_q, block_kv) if causal else block_kv
    q_p = _pad_to(q, 1, math.lcm(tile_q, block_kv) if causal else tile_q)
    k_p, v_p = _pad_to(k, 1, kv_multiple), _pad_to(v, 1, kv_multiple)
    bias_p = None
    if bias is not None:
        bias4 = bias.reshape((1,) * (4 - bias.ndim) + tuple(bias.shape))
        bias4 = jnp.broadcast_to(bias4, bias4.shape[:2] + (q_len, kv_len)).astype(q.dtype)
        bias_p = _pad_to(_pad_to(bias4, 2, q_p.shape[1]), 3, k_p.shape[1])
    return q_p, k_p, v_p, bias_p


@functools.partial(jax.jit, static_argnames=("causal", "scale", "block_q", "block_kv", "stages", "interpret"))
def _forward(q, k, v, bias, *, causal, scale, block_q, block_kv, stages, interpret):
    q_len, kv_len = q.shape[1], k.shape[1]
    q_p, k_p, v_p, bias_p = _padded_inputs(q, k, v, bias, causal=causal, block_q=block_q, block_kv=block_kv)
    out, lse2 = _kernel_call(q_p, k_p, v_p, bias_p, causal=causal, scale=scale, kv_len=kv_len, block_q=block_q,
                             block_kv=block_kv, stages=stages, interpret=interpret)
    return out[:, :q_len], lse2[:, :, :q_len]


def _check_blocks(block_q, block_kv, stages):
    if block_q % 64:
        raise ValueError(f"block_q={block_q} must be a multiple of 64")
    if block_kv % 64 or stages < 2:
        raise ValueError(f"block_kv={block_kv} must be a multiple of 64 and stages={stages} at least 2")


def flash_attention_sm90(q, k, v, *, bias=None, causal=False, scale=None, block_q=64, block_kv=None,
                         stages=2, return_lse=False, interpret=False):
    """softmax(q k^T * scale + bias) v on an sm90 GPU, forward only.

    q [batch, q_len, heads, head_dim]; k, v [batch, kv_len, kv_heads, head_dim] (kv_heads
    divides heads); bias broadcastable to [batch, heads, q_len, kv_len], cast to q's dtype;
    causal is start-aligned and needs q_len == kv_len. bf16/fp16 inputs, head_dim 64 or 128;
    float32 accumulation. Returns [batch, q_len, heads, head_dim] in q's dtype, and with
    ``return_lse`` also the log-sum-exp of each row's logits in base 2, [batch, heads, q_len]
    float32 (what ``flash_attention_sm90_bwd`` takes). ``interpret=True`` runs the kernel in
    jax's Mosaic GPU interpreter on any host (slow; for tests).
    """
    check_sm90_inputs(q, k, v, bias, causal)
    if block_kv is None:  # the bias ring takes shared memory: smaller key tiles keep all stages resident
        block_kv = 64 if bias is not None else 128
    _check_blocks(block_q, block_kv, stages)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    out, lse2 = _forward(q, k, v, bias, causal=bool(causal), scale=scale, block_q=block_q, block_kv=block_kv,
                         stages=stages, interpret=bool(interpret))
    return (out, lse2) if return_lse else out
