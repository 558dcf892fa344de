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
the same producer/consumer shape, in ``flash_attention_sm90_bwd.py``. The front-door adapter
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
        if _LOAD_TAKES_INDEX:  # jax 0.10 (see _load_takes_index)
            return self.plgpu.load(ref, (), layout=layout)
        return self.plgpu.load(ref, layout=layout)

    def mma(self, acc, a, b, *, transpose_a=False, transpose_b=False, during=None):
        """acc + a @ b (a or b transposed if asked) in float32; acc None starts from zero. a is a
        shared-memory ref (transposable) or a register array; b a shared-memory ref. ``during`` runs
        while the product is in flight (before its result is awaited)."""
        pl, plgpu = self.pl, self.plgpu
        if self.interpret:
            a_val = a if isinstance(a, jax.Array) else a[...]
            b_val = b[...]
            out = jnp.dot(a_val.T if transpose_a else a_val, b_val.T if transpose_b else b_val,
                          preferred_element_type=jnp.float32)
            if during is not None:
                during()
            return out if acc is None else acc + out
        a = a.transpose((1, 0)) if transpose_a else a
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
    """Whether ``plgpu.load`` needs an index: jax 0.10 requires one, 0.11 makes it optional (and
    deprecates passing it), 0.12 has no such parameter."""
    import inspect

    try:
        _, plgpu = _mosaic_gpu()
        idx = inspect.signature(plgpu.load).parameters.get("idx")
    except Exception:  # noqa: BLE001 - no Mosaic GPU: never called
        return True
    return idx is not None and idx.default is inspect.Parameter.empty


_LOAD_TAKES_INDEX = _load_takes_index()


def _interpret_params(interpret: bool):
    if not interpret:
        return None
    _, plgpu = _mosaic_gpu()
    if hasattr(plgpu, "InterpretGPUParams"):  # public from jax 0.12
        return plgpu.InterpretGPUParams()
    from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams  # jax 0.10-0.11
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
                 interpret=False, persistent=0):
    """The forward kernel on padded inputs: q [B, Qp, H, D], k/v [B, Kp, Hkv, D], bias None or
    [Bb, Hb, Qp, Kp] in q's dtype, key_bias None or [Bk, Kp] float32; Qp % (2 block_q) == 0,
    Kp % block_kv == 0. Returns the output [B, Qp, H, D] and the base-2 log-sum-exp of the scaled
    logits [B, H, Qp] (float32). ``persistent`` > 0: a grid of that many CTAs, each looping over
    query tiles (longest first when causal), the producer loading a tile's keys while the consumers
    finish the one before; 0: one CTA per query tile."""
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

    q_tiles = q_pad // (_COMPUTE_WGS * block_q)

    def body(q_ref, k_ref, v_ref, bias_ref, kb_ref, out_ref, lse_ref, smem, produced, consumed, schedule_barrier):
        wg = lax.axis_index("wg")
        qo_smem2, k_smem, v_smem, bias_smem, kb_smem, lse_smem2 = smem
        k_ready, v_ready, q_ready = produced
        k_free, v_free = consumed

        def schedule():  # ping-pong: wait for the other consumer's turn on the tensor cores
            plgpu.barrier_arrive(schedule_barrier)
            plgpu.barrier_wait(schedule_barrier)

        def cta_tile(q_tile):
            """The CTA's first query row and the key tiles it needs (causal: up to its last row)."""
            cta_q_base = q_tile * (_COMPUTE_WGS * block_q)
            if causal:
                return cta_q_base, pl.cdiv(cta_q_base + _COMPUTE_WGS * block_q, jnp.array(block_kv, jnp.int32))
            return cta_q_base, total_kv_steps

        def each_tile(run):
            """run(q_head, b, q_tile) for the CTA's query tile, or its share of them when persistent.
            Each tile's barrier phases and ring slots balance, so tiles can follow one another."""
            if not persistent:
                run(lax.axis_index("heads"), lax.axis_index("batch"), lax.axis_index("q_seq"))
                return

            @plgpu.nd_loop((q_tiles, heads, batch), collective_axes="cta")
            def _(info):
                order, q_head, b = info.index
                run(q_head, b, (q_tiles - 1 - order) if causal else order)  # causal: the longest first

        def consumer_tile(q_head, b, q_tile):
            cta_q_base, cta_kv_steps = cta_tile(q_tile)
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

        def producer_tile(q_head, b, q_tile):
            cta_q_base, cta_kv_steps = cta_tile(q_tile)
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

        @pl.when(wg < _COMPUTE_WGS)
        def _consumer():
            plgpu.set_max_registers(232, action="increase")
            each_tile(consumer_tile)

        @pl.when(wg == _COMPUTE_WGS)
        def _producer():
            plgpu.set_max_registers(40, action="decrease")
            each_tile(producer_tile)

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
    if persistent:
        grid = dict(grid=(min(persistent, q_tiles * heads * batch),), grid_names=("cta",))
    else:
        grid = dict(grid=(heads, q_tiles, batch), grid_names=("heads", "q_seq", "batch"))
    return plgpu.kernel(
        entry,
        out_type=(jax.ShapeDtypeStruct(q.shape, dtype), jax.ShapeDtypeStruct((batch, heads, q_pad), jnp.float32)),
        **grid,
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


@functools.partial(jax.jit, static_argnames=("causal", "scale", "block_q", "block_kv", "stages", "interpret",
                                             "persistent"))
def _forward(q, k, v, bias, key_bias=None, *, causal, scale, block_q, block_kv, stages, interpret, persistent=0):
    q_len, kv_len = q.shape[1], k.shape[1]
    q_p, k_p, v_p, bias_p, kb_p = _padded_inputs(q, k, v, bias, key_bias, causal=causal, block_q=block_q,
                                                 block_kv=block_kv)
    out, lse2 = _kernel_call(q_p, k_p, v_p, bias_p, kb_p, causal=causal, scale=scale, kv_len=kv_len,
                             block_q=block_q, block_kv=block_kv, stages=stages, interpret=interpret,
                             persistent=persistent)
    return out[:, :q_len], lse2[:, :, :q_len]


def _check_blocks(block_q, block_kv, stages):
    if block_q % 64:
        raise ValueError(f"block_q={block_q} must be a multiple of 64")
    if block_kv % 64 or stages < 2:
        raise ValueError(f"block_kv={block_kv} must be a multiple of 64 and stages={stages} at least 2")


# Configurations the tuner measures (``kernels/sm90_tuning.py``), keyed by whether there is a bias;
# the first is the default where tuning is off or not on an sm90 GPU: the tuner's pick on an H200
# at head_dim 128, seq 4096 (benchmarks/results/sm90_tuning_h200.json). (block_kv, stages) with
# 2 x 64 query rows per CTA (a bias ring takes shared memory, so smaller key tiles with it).
FWD_CANDIDATES = {False: ((128, 2), (128, 3), (64, 2), (64, 4)), True: ((64, 2), (64, 3), (64, 4), (128, 2))}
# The persistent grid joins them at the first two configurations, since its GPU tests passed on an
# H200 (tests/test_flash_sm90.py -m gpu, 2026-12-04); the tuner keeps it where it measures faster
# (there: the causal forward at 16k, 1.02x cuDNN against 0.86x; elsewhere within the run's spread).
SM90_PERSISTENT_GPU_TESTED = True


def fwd_candidates(biased: bool) -> tuple:
    """The forward configurations the tuner may pick from: (block_kv, stages) or, once GPU-tested,
    (block_kv, stages, True) for the persistent grid."""
    plain = FWD_CANDIDATES[biased]
    return plain + (tuple(c + (True,) for c in plain[:2]) if SM90_PERSISTENT_GPU_TESTED else ())


def _concrete(shape, dtype, seed):
    import numpy as np
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), dtype)


def _tuned(pass_name, q, k, bias, causal, candidates, make_run, *, interpret, tuner=None, key_bias=None):
    """The tuner's choice among ``candidates`` for this shape class (measured now if new), or the
    first candidate where tuning is off or there is no sm90 GPU (and not interpreting)."""
    from sciscale_jax.kernels import sm90_tuning
    tuner = tuner if tuner is not None else sm90_tuning.default_tuner()
    if tuner is None or not (interpret or sm90_supported()):
        return candidates[0]
    kind = "interpret" if interpret else jax.devices("gpu")[0].device_kind
    key = sm90_tuning.shape_key(kind, pass_name, q.shape[-1], q.dtype, causal, bias is not None, q.shape[1],
                                k.shape[1], key_bias is not None)
    # Measured on a thread of its own: jax's trace state is per thread, so the candidates run as
    # plain computations even while the caller is being traced.
    import concurrent.futures
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        best = pool.submit(tuner.best, key, candidates, make_run).result()
    return candidates[0] if best is None else best


def _forward_config(q, k, v, bias, causal, scale, block_q, interpret, tuner=None, key_bias=None):
    """(block_kv, stages) or (block_kv, stages, persistent) for the forward kernel on inputs shaped
    like these."""
    def make_run(config):
        args = [_concrete(x.shape, x.dtype, i) for i, x in enumerate((q, k, v))]
        b = None if bias is None else _concrete(bias.shape, q.dtype, 3)
        kb = None if key_bias is None else jnp.zeros(key_bias.shape, jnp.float32)
        ctas = _persistent_ctas(len(config) > 2 and config[2], interpret)
        return lambda: _forward(*args, b, kb, causal=causal, scale=scale, block_q=block_q, block_kv=config[0],
                                stages=config[1], interpret=interpret, persistent=ctas)

    return _tuned("fwd", q, k, bias, causal, fwd_candidates(bias is not None), make_run, interpret=interpret,
                  tuner=tuner, key_bias=key_bias)


def _persistent_ctas(persistent, interpret) -> int:
    """CTAs of a persistent grid: 0 (off), the GPU's SM count for True, else the count given."""
    if persistent is True:
        return 2 if interpret else int(jax.devices("gpu")[0].core_count)
    if not persistent:
        return 0
    if not isinstance(persistent, int) or persistent < 1:
        raise ValueError(f"persistent={persistent!r}: give True, False or a number of CTAs >= 1")
    return persistent


def flash_attention_sm90(q, k, v, *, bias=None, key_bias=None, causal=False, scale=None, block_q=64, block_kv=None,
                         stages=None, return_lse=False, persistent=None, interpret=False):
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
    ``persistent=True`` runs one CTA per SM, each looping over query tiles (the longest first when
    causal), so the producer loads a tile's keys while the consumers finish the one before; a number
    sets the CTA count; None leaves it to the tuner with block_kv and stages (its candidates
    include it: ``SM90_PERSISTENT_GPU_TESTED``; off where tuning is off).
    ``interpret=True`` runs the kernel in jax's Mosaic GPU interpreter on any host (slow; tests).
    """
    check_sm90_inputs(q, k, v, bias, causal, key_bias)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    if block_kv is None and stages is None and persistent is None and not interpret:
        config = _forward_config(q, k, v, bias, bool(causal), scale, block_q, False, key_bias=key_bias)
        block_kv, stages, persistent = config[0], config[1], len(config) > 2 and config[2]
    persistent = _persistent_ctas(persistent, interpret)
    default_kv, default_stages = FWD_CANDIDATES[bias is not None][0]
    block_kv = default_kv if block_kv is None else block_kv
    stages = default_stages if stages is None else stages
    _check_blocks(block_q, block_kv, stages)
    out, lse2 = _forward(q, k, v, bias, key_bias, causal=bool(causal), scale=scale, block_q=block_q,
                         block_kv=block_kv, stages=stages, interpret=bool(interpret), persistent=persistent)
    return (out, lse2) if return_lse else out
