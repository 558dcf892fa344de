"""The sm90 (Hopper) flash attention forward kernel and its front-door adapter.

On CPU: input checks raise before compilation; the kernels lower to Mosaic GPU for CUDA; and
jax's Mosaic GPU interpreter runs the forward and backward kernels themselves (copies,
barriers, warpgroups; products as float32 dots) against float32/float64 attention, also
through the front door's custom VJP. On an sm90 GPU (marked ``gpu``): the compiled kernels
against float32 attention on the same bf16/fp16 inputs.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sciscale_jax.attention import sm90 as adapter
from sciscale_jax.kernels import flash_attention_sm90 as kernel
from sciscale_jax.kernels import flash_attention_sm90_bwd as backward


def _qkv(shape_q, kv_len, kv_heads, dtype=jnp.bfloat16, seed=0):
    r = np.random.default_rng(seed)
    b, q_len, heads, d = shape_q
    q = jnp.asarray(r.normal(size=shape_q), dtype)
    k = jnp.asarray(r.normal(size=(b, kv_len, kv_heads, d)), dtype)
    v = jnp.asarray(r.normal(size=(b, kv_len, kv_heads, d)), dtype)
    return q, k, v


def _reference(q, k, v, bias=None, mask=None, causal=False, scale=None):
    """Plain softmax attention in float32 (float64 under x64)."""
    acc = jnp.promote_types(q.dtype, jnp.float32)
    heads, kv_heads, d = q.shape[2], k.shape[2], q.shape[3]
    k = jnp.repeat(k, heads // kv_heads, axis=2).astype(acc)
    v = jnp.repeat(v, heads // kv_heads, axis=2).astype(acc)
    s = jnp.einsum("bqhd,bkhd->bhqk", q.astype(acc), k) * (d ** -0.5 if scale is None else scale)
    if bias is not None:
        s = s + bias.astype(acc)
    valid = jnp.ones(s.shape[-2:], bool)
    if causal:
        valid = jnp.tril(valid)
    if mask is not None:
        valid = valid & mask
    s = jnp.where(valid, s, -jnp.inf)
    p = jnp.exp(s - jnp.max(s, axis=-1, keepdims=True))
    p = jnp.where(valid, p, 0)
    p = p / jnp.maximum(jnp.sum(p, axis=-1, keepdims=True), 1e-30)
    return jnp.einsum("bhqk,bkhd->bqhd", p, v)


def _rel_err(out, ref):
    out, ref = np.asarray(out, np.float64), np.asarray(ref, np.float64)
    return np.linalg.norm(out - ref) / np.linalg.norm(ref)


@pytest.mark.parametrize("kwargs, match", [
    (dict(dtype=jnp.float32), "bfloat16 or float16"),
    (dict(d=80), "head_dim"),
    (dict(heads=3), "does not divide"),
    (dict(causal=True, kv_len=40), "q_len == kv_len"),
    (dict(bias_shape=(1, 2, 5, 48)), "does not broadcast"),
    (dict(key_bias_shape=(3, 48)), "key_bias"),
    (dict(key_bias_shape=(1, 1, 48)), "key_bias"),
])
def test_bad_input_raises_before_compiling(kwargs, match):
    d, heads, dtype = kwargs.get("d", 64), kwargs.get("heads", 2), kwargs.get("dtype", jnp.bfloat16)
    q = jnp.ones((1, 48, heads, d), dtype)
    k = v = jnp.ones((1, kwargs.get("kv_len", 48), 2, d), dtype)
    bias = jnp.ones(kwargs["bias_shape"], jnp.float32) if "bias_shape" in kwargs else None
    key_bias = jnp.zeros(kwargs["key_bias_shape"], jnp.float32) if "key_bias_shape" in kwargs else None
    with pytest.raises(ValueError, match=match):
        kernel.flash_attention_sm90(q, k, v, bias=bias, key_bias=key_bias, causal=kwargs.get("causal", False))


def test_front_door_check_refuses_without_an_sm90_gpu():
    if kernel.sm90_supported():
        pytest.skip("an sm90 GPU is present")
    q = jnp.ones((1, 64, 2, 64), jnp.bfloat16)
    with pytest.raises(ValueError, match="compute capability 9"):
        adapter.sm90_attention(q, q, q)


def _load_jax_0_10(src, idx, *, layout=None): ...
def _load_jax_0_11(src, idx=None, *, layout=None): ...
def _load_jax_0_12(src, *, layout=None, optimized=True): ...


@pytest.mark.parametrize("load, takes_index", [(_load_jax_0_10, True), (_load_jax_0_11, False),
                                               (_load_jax_0_12, False)])
def test_load_index_probe_reads_each_jax_signature(monkeypatch, load, takes_index):
    """``plgpu.load``'s signature across jax versions (0.12 has no ``idx``; the probe once read
    that as 'required', and every kernel failed to lower there)."""
    class FakeMosaicGpu:
        pass

    FakeMosaicGpu.load = staticmethod(load)
    monkeypatch.setattr(kernel, "_mosaic_gpu", lambda: (None, FakeMosaicGpu))
    assert kernel._load_takes_index() is takes_index


@pytest.mark.parametrize("causal, bias_shape, head_dim, q_len, kv_len, kv_heads", [
    (False, None, 128, 256, 256, 2),
    (True, None, 64, 300, 300, 1),
    (False, (1, 2, 1, 200), 64, 130, 200, 2),
    (True, (2, 1, 300, 300), 128, 300, 300, 2),
    (False, (1, 2, 256, 256), 32, 256, 256, 2),   # the Evoformer's head_dim: 64-byte rows, 64-byte swizzle
    (True, None, 96, 300, 300, 1),                # 192-byte rows: 64-byte swizzle
])
def test_kernel_lowers_to_mosaic_gpu_for_cuda(causal, bias_shape, head_dim, q_len, kv_len, kv_heads):
    """Traces the kernel body and runs Pallas's Mosaic GPU lowering (layouts, transforms, barriers)
    for a CUDA target, on any host: catches mistakes a GPU run would otherwise find first."""
    q = jax.ShapeDtypeStruct((2, q_len, 2, head_dim), jnp.bfloat16)
    kv = jax.ShapeDtypeStruct((2, kv_len, kv_heads, head_dim), jnp.bfloat16)
    bias = None if bias_shape is None else jax.ShapeDtypeStruct(bias_shape, jnp.float32)
    fn = jax.jit(lambda q, k, v, b: kernel.flash_attention_sm90(q, k, v, bias=b, causal=causal))
    text = fn.trace(q, kv, kv, bias).lower(lowering_platforms=("cuda",)).as_text()
    assert "mosaic_gpu" in text


def _reference_lse2(q, k, v, bias=None, causal=False, scale=None):
    """log2 of each row's sum of exp(logits), float32: [batch, heads, q_len]."""
    heads, kv_heads, d = q.shape[2], k.shape[2], q.shape[3]
    k = jnp.repeat(k, heads // kv_heads, axis=2).astype(jnp.float32)
    s = jnp.einsum("bqhd,bkhd->bhqk", q.astype(jnp.float32), k) * (d ** -0.5 if scale is None else scale)
    if bias is not None:
        s = s + bias.astype(jnp.float32)
    if causal:
        s = jnp.where(jnp.tril(jnp.ones(s.shape[-2:], bool)), s, -jnp.inf)
    return jax.nn.logsumexp(s, axis=-1) / np.log(2)


@pytest.mark.parametrize("causal, bias_shape, q_len, kv_len, heads, kv_heads, head_dim", [
    pytest.param(True, (1, 2, 150, 150), 150, 150, 2, 1, 64, marks=pytest.mark.slow),  # the backward test runs this
    (False, (1, 1, 1, 200), 130, 200, 1, 1, 64),               # per-key bias, padded keys masked
    pytest.param(False, None, 128, 128, 2, 2, 64, marks=pytest.mark.slow),
    pytest.param(True, (1, 1, 200, 200), 200, 200, 2, 2, 64, marks=pytest.mark.slow),
    pytest.param(True, None, 80, 80, 2, 1, 96, marks=pytest.mark.slow),  # the backward test runs head_dim 32
])
def test_kernel_in_gpu_interpret_mode_matches_float32_reference(causal, bias_shape, q_len, kv_len, heads,
                                                                 kv_heads, head_dim):
    """The kernel itself, run by jax's Mosaic GPU interpreter on the CPU: TMA copies, the stage
    ring, the barrier protocol of producer and ping-ponging consumers (the interpreter checks
    that every barrier phase is awaited), causal block skipping, masks and padding; products as
    float32 dots (``_Ops``). Output and base-2 log-sum-exp against float32 attention."""
    q, k, v = _qkv((1, q_len, heads, head_dim), kv_len, kv_heads, jnp.bfloat16, seed=q_len)
    bias = None
    if bias_shape is not None:
        bias = jnp.asarray(np.random.default_rng(4).normal(size=bias_shape), jnp.bfloat16)
    out, lse2 = kernel.flash_attention_sm90(q, k, v, bias=bias, causal=causal, return_lse=True, interpret=True)
    assert out.shape == q.shape and out.dtype == q.dtype and lse2.shape == (1, heads, q_len)
    assert _rel_err(out, _reference(q, k, v, bias, None, causal)) < 1e-2
    np.testing.assert_allclose(lse2, _reference_lse2(q, k, v, bias, causal), rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("causal, bias_shape, q_len, kv_len, heads, kv_heads, ctas", [
    (True, (1, 2, 300, 300), 300, 300, 2, 1, 3),   # 12 query tiles over 3 CTAs, the longest first
    pytest.param(False, (1, 1, 1, 200), 130, 200, 2, 2, 5, marks=pytest.mark.slow),  # 4 tiles, 5 CTAs asked
])
def test_persistent_forward_in_gpu_interpret_mode_matches_float32_reference(causal, bias_shape, q_len, kv_len, heads,
                                                                             kv_heads, ctas):
    """The persistent grid: fewer CTAs than query tiles, each looping over its share, the ring and
    barrier phases carried from one tile to the next (the interpreter checks every phase is
    awaited); output and log-sum-exp against float32 attention."""
    q, k, v = _qkv((2, q_len, heads, 64), kv_len, kv_heads, jnp.bfloat16, seed=q_len)
    bias = jnp.asarray(np.random.default_rng(4).normal(size=bias_shape), jnp.bfloat16)
    out, lse2 = kernel.flash_attention_sm90(q, k, v, bias=bias, causal=causal, return_lse=True, persistent=ctas,
                                            interpret=True)
    assert _rel_err(out, _reference(q, k, v, bias, None, causal)) < 1e-2
    np.testing.assert_allclose(lse2, _reference_lse2(q, k, v, bias, causal), rtol=1e-3, atol=1e-3)


def test_persistent_joins_the_forward_candidates_once_gpu_tested(monkeypatch):
    """Without a passing GPU run the tuner never tries the persistent grid; with one it tries it at
    the first two configurations, and the configuration it would time runs the persistent kernel."""
    monkeypatch.setattr(kernel, "SM90_PERSISTENT_GPU_TESTED", False)
    assert all(len(c) == 2 for c in kernel.fwd_candidates(False) + kernel.fwd_candidates(True))
    monkeypatch.setattr(kernel, "SM90_PERSISTENT_GPU_TESTED", True)
    assert kernel.fwd_candidates(False)[4:] == ((128, 2, True), (128, 3, True))
    seen = {}

    def spy_tuned(pass_name, q, k, bias, causal, candidates, make_run, **kwargs):
        seen["candidates"] = candidates
        chosen = next(c for c in candidates if len(c) > 2)
        seen["out"] = make_run(chosen)()
        return chosen

    monkeypatch.setattr(kernel, "_tuned", spy_tuned)
    real_forward, grids = kernel._forward, []

    def spy_forward(*args, persistent=0, **kwargs):
        grids.append(persistent)
        return real_forward(*args, persistent=persistent, **kwargs)

    monkeypatch.setattr(kernel, "_forward", spy_forward)
    q = jnp.zeros((1, 200, 2, 64), jnp.bfloat16)
    config = kernel._forward_config(q, q, q, None, True, 0.125, 64, True)
    assert config == (128, 2, True) and (128, 3, True) in seen["candidates"] and len(seen["candidates"]) == 6
    assert grids == [2]   # the interpreter's persistent grid: 2 CTAs for 4 query tiles
    timed = [kernel._concrete(q.shape, q.dtype, i) for i in range(3)]  # what the tuner times on
    assert _rel_err(seen["out"][0], _reference(*timed, None, None, True, scale=0.125)) < 1e-2


@pytest.mark.parametrize("persistent", [-1, 1.5, "yes"])
def test_persistent_takes_a_bool_or_a_cta_count(persistent):
    q = jnp.zeros((1, 64, 1, 64), jnp.bfloat16)
    with pytest.raises(ValueError, match="persistent"):
        kernel.flash_attention_sm90(q, q, q, persistent=persistent, interpret=True)


@pytest.mark.parametrize("causal, head_dim, bias_shape", [(True, 128, None), (False, 32, (1, 2, 256, 256))])
def test_persistent_forward_lowers_to_mosaic_gpu_for_cuda(causal, head_dim, bias_shape):
    """The persistent grid (132 CTAs, an H100's SM count) passes Mosaic GPU's lowering for CUDA."""
    q = jax.ShapeDtypeStruct((2, 256, 2, head_dim), jnp.bfloat16)
    bias = None if bias_shape is None else jax.ShapeDtypeStruct(bias_shape, jnp.bfloat16)
    kb = jax.ShapeDtypeStruct((2, 256), jnp.float32)
    fn = jax.jit(lambda q, k, v, b, kb: kernel.flash_attention_sm90(q, k, v, bias=b, key_bias=kb, causal=causal,
                                                                    persistent=132))
    assert "mosaic_gpu" in fn.trace(q, q, q, bias, kb).lower(lowering_platforms=("cuda",)).as_text()


def _grad_errors(grads, q, k, v, bias, do, mask=None, causal=False):
    """Relative errors of (dq, dk, dv, dbias) against float64 gradients of plain attention on the
    same (bf16-rounded) inputs."""
    with jax.enable_x64(True):
        args = [None if x is None else jnp.asarray(np.asarray(x, np.float64)) for x in (q, k, v, bias)]
        _, vjp = jax.vjp(lambda q, k, v, b: _reference(q, k, v, b, mask, causal), *args)
        ref = vjp(jnp.asarray(np.asarray(do, np.float64)))
    return [None if g is None else _rel_err(g, r) for g, r in zip(grads, ref)]


_BACKWARD_CASES = [  # (causal, bias_shape, q_len, kv_len, heads, kv_heads, head_dim, key_mask), fused cases fast
    ((True, (1, 2, 70, 70), 70, 70, 2, 1, 64, False), ()),  # the front door runs it
    ((False, None, 128, 128, 1, 1, 64, False), ()),
    ((False, (2, 1, 1, 200), 130, 200, 2, 2, 64, False), ()),  # dbias summed over q
    ((True, (1, 2, 150, 150), 150, 150, 2, 1, 64, False), ()),
    # The Evoformer's shape: head_dim 32, a pair bias summed over the batch (MSA rows), a key mask per
    # row; fast unfused (the default backward), the fused kernel runs fast on the front door's case
    ((False, (1, 2, 96, 96), 96, 96, 2, 2, 32, True), (False,)),
    # 40 keys pad to 64, half a dK/dV CTA's 128: the backward pads keys to whole CTAs (before, the
    # last 64 keys of such lengths got no dK/dV at all).
    ((False, None, 64, 40, 1, 1, 64, False), (False, True)),
]


@pytest.mark.parametrize("causal, bias_shape, q_len, kv_len, heads, kv_heads, head_dim, key_mask, fused", [
    pytest.param(*case, fused, marks=() if fused in fast else pytest.mark.slow)
    for case, fast in _BACKWARD_CASES for fused in (False, True)])
def test_backward_kernels_in_gpu_interpret_mode_match_float64_gradients(causal, bias_shape, q_len, kv_len, heads,
                                                                         kv_heads, head_dim, key_mask, fused):
    """dK/dV, dQ and dbias kernels, run by the Mosaic GPU interpreter on the CPU, from the forward
    kernel's log-sum-exp: every gradient within bf16 rounding of float64 attention's (the forward's
    output too where the forward test does not run the case). A key mask enters as ``key_bias``.
    Fused: dQ from the dK/dV kernel's dS, summed over its key tiles (the reduce-add emulated)."""
    batch = 2 if bias_shape is None or bias_shape[0] == 2 or bias_shape[0] == 1 else 1
    q, k, v = _qkv((batch, q_len, heads, head_dim), kv_len, kv_heads, jnp.bfloat16, seed=q_len + 1)
    r = np.random.default_rng(6)
    bias = None if bias_shape is None else jnp.asarray(r.normal(size=bias_shape), jnp.bfloat16)
    do = jnp.asarray(r.normal(size=q.shape), jnp.bfloat16)
    mask = key_bias = None
    if key_mask:  # about a third of the keys masked, a different set per batch row
        keep = jnp.asarray(r.random((batch, kv_len)) < 0.7).at[:, 0].set(True)
        mask, key_bias = keep[:, None, None, :], jnp.where(keep, 0.0, -30000.0)
    out, lse2 = kernel.flash_attention_sm90(q, k, v, bias=bias, key_bias=key_bias, causal=causal, return_lse=True,
                                            interpret=True)
    assert _rel_err(out, _reference(q, k, v, bias, mask, causal)) < 1e-2
    grads = backward.flash_attention_sm90_bwd(q, k, v, out, lse2, do, bias=bias, key_bias=key_bias, causal=causal,
                                              fused=fused, interpret=True)
    for g, x in zip(grads, (q, k, v, bias)):
        assert (g is None) == (x is None)
        assert g is None or (g.shape == x.shape and g.dtype == x.dtype)
    errors = _grad_errors(grads, q, k, v, bias, do, mask=mask, causal=causal)
    assert max(e for e in errors if e is not None) < 1e-2, errors


@pytest.mark.parametrize("mask_shape, fused", [((2, 1, 1, 70), None), ((2, 1, 70, 70), True)])
def test_front_door_gradients_through_the_interpreted_kernels(monkeypatch, mask_shape, fused):
    """The adapter's custom VJP on the real kernels (interpreted; causal, GQA, padded to a tile):
    a mask per key reaches the kernels as their [B, K] key bias and the pair bias stays
    [1, H, Q, K] (nothing [B, H, Q, K] is built); another mask joins the bias. Rows with nothing
    to attend come back zero, and every gradient, the pair bias's in its own shape, matches float64.
    ``fused=True`` reaches the backward (the fused kernel) and, in that case, ``persistent=True``
    the forward (its persistent grid)."""
    seen, fused_seen, persistent_seen = [], [], []

    def spy(fn):
        def call(*args, bias=None, key_bias=None, **kwargs):
            seen.append((None if bias is None else bias.shape, None if key_bias is None else key_bias.shape))
            if "fused" in kwargs:
                fused_seen.append(kwargs["fused"])
            if "persistent" in kwargs:
                persistent_seen.append(kwargs["persistent"])
            return fn(*args, bias=bias, key_bias=key_bias, interpret=True, **kwargs)
        return call

    monkeypatch.setattr(adapter, "sm90_supported", lambda: True)
    monkeypatch.setattr(adapter, "flash_attention_sm90", spy(kernel.flash_attention_sm90))
    monkeypatch.setattr(adapter, "flash_attention_sm90_bwd", spy(backward.flash_attention_sm90_bwd))
    q, k, v = _qkv((2, 70, 2, 64), 70, 1, jnp.bfloat16, seed=9)
    r = np.random.default_rng(10)
    bias = jnp.asarray(r.normal(size=(1, 2, 70, 70)), jnp.float32)
    mask = jnp.asarray(r.random(mask_shape) < 0.8).at[0, :, :, 0].set(True).at[1].set(False)
    do = jnp.asarray(r.normal(size=q.shape), jnp.bfloat16)
    out, vjp = jax.vjp(lambda q, k, v, b: adapter.sm90_attention(q, k, v, bias=b, mask=mask, causal=True,
                                                                 fused=fused, persistent=True if fused else None),
                       q, k, v, bias)
    grads = vjp(do)
    per_key = mask_shape[2] == 1
    assert seen == [((1, 2, 70, 70), (2, 70)) if per_key else ((2, 2, 70, 70), None)] * 2  # forward, backward
    assert fused_seen == [fused] and persistent_seen == [True if fused else None]
    assert bool(jnp.all(out[1] == 0))  # batch row 1 attends to nothing
    assert grads[3].shape == bias.shape and grads[3].dtype == bias.dtype
    assert _rel_err(out[0], _reference(q, k, v, bias, mask, causal=True)[0]) < 1e-2
    # Only batch row 0 contributes: compare there (row 1's gradients are zero on both sides).
    errors = _grad_errors([g[:1] if g.shape[0] == 2 else g for g in grads], q[:1], k[:1], v[:1], bias, do[:1],
                          mask=mask[:1], causal=True)
    assert max(errors) < 1e-2, errors
    assert bool(jnp.all(grads[0][1] == 0)) and bool(jnp.all(grads[1][1] == 0))


def _lower_backward(head_dim, bias_shape=None, key_bias=False, **kwargs):
    """The backward's lowering for a CUDA target (text), on any host."""
    q = jax.ShapeDtypeStruct((2, 130, 2, head_dim), jnp.bfloat16)
    kv = jax.ShapeDtypeStruct((2, 200, 1, head_dim), jnp.bfloat16)
    lse = jax.ShapeDtypeStruct((2, 2, 130), jnp.float32)
    bias = None if bias_shape is None else jax.ShapeDtypeStruct(bias_shape, jnp.bfloat16)
    kb = jax.ShapeDtypeStruct((2, 200), jnp.float32) if key_bias else None
    fn = jax.jit(lambda q, k, v, b, kb, o, l, do: backward.flash_attention_sm90_bwd(q, k, v, o, l, do, bias=b,
                                                                                    key_bias=kb, **kwargs))
    return fn.trace(q, kv, kv, bias, kb, q, lse, q).lower(lowering_platforms=("cuda",)).as_text()


@pytest.mark.parametrize("head_dim, bias_shape", [(128, (1, 2, 130, 200)), (32, None)])
def test_key_bias_lowers_to_mosaic_gpu_for_cuda(head_dim, bias_shape):
    """With a key bias (per batch row and key, read per key tile) the forward and the three
    backward kernels pass Mosaic GPU's lowering for CUDA, head_dim 128's shared memory included."""
    q = jax.ShapeDtypeStruct((2, 130, 2, head_dim), jnp.bfloat16)
    kv = jax.ShapeDtypeStruct((2, 200, 1, head_dim), jnp.bfloat16)
    bias = None if bias_shape is None else jax.ShapeDtypeStruct(bias_shape, jnp.bfloat16)
    key_bias = jax.ShapeDtypeStruct((2, 200), jnp.float32)
    fwd = jax.jit(lambda q, k, v, b, kb: kernel.flash_attention_sm90(q, k, v, bias=b, key_bias=kb))
    assert "mosaic_gpu" in fwd.trace(q, kv, kv, bias, key_bias).lower(lowering_platforms=("cuda",)).as_text()
    text = _lower_backward(head_dim, bias_shape, key_bias=True)
    assert text.count("mosaic_gpu") >= (3 if bias_shape else 2)


@pytest.mark.parametrize("head_dim", [128, 96, 32])
def test_backward_lowers_to_mosaic_gpu_for_cuda(head_dim):
    """The three backward kernels with a broadcast bias (at head_dim 128 the largest shared-memory
    use; 96 and 32 take a 64-byte swizzle) pass Mosaic GPU's lowering for a CUDA target,
    shared-memory budget included."""
    assert _lower_backward(head_dim, (1, 2, 130, 200)).count("mosaic_gpu") >= 3


@pytest.mark.parametrize("head_dim, bias_shape, key_bias, bias_grad", [
    (128, None, False, True), (96, None, True, True), (64, (1, 2, 130, 200), True, True),
    (32, (1, 2, 130, 200), True, True), (64, (2, 1, 1, 200), False, False)])
def test_fused_backward_lowers_to_mosaic_gpu_for_cuda(head_dim, bias_shape, key_bias, bias_grad):
    """The fused kernel (dS read transposed from shared memory against K; float32 dQ and dbias^T
    taken by reference and reduce-added into by TMA) passes Mosaic GPU's lowering for CUDA, shared
    memory included: one kernel where the unfused backward runs two (three with a bias gradient)."""
    fused = _lower_backward(head_dim, bias_shape, key_bias, fused=True, bias_grad=bias_grad)
    unfused = _lower_backward(head_dim, bias_shape, key_bias, fused=False, bias_grad=bias_grad)
    kernels = lambda text: text.count("custom_call @mosaic_gpu")  # noqa: E731
    assert kernels(fused) == 1 and kernels(unfused) == (3 if bias_shape and bias_grad else 2)


@pytest.mark.parametrize("head_dim, has_bias, stages", [(128, False, 2), (128, False, 3), (128, True, 2),
                                                        (64, True, 3), (64, True, 4)])
def test_fused_fits_agrees_with_the_mosaic_gpu_shared_memory_check(monkeypatch, head_dim, has_bias, stages):
    """``fused_fits`` (which decides where the fused backward may run and which candidates the tuner
    tries) says yes exactly where Mosaic GPU's own shared-memory check passes the lowering."""
    fits = backward.fused_fits(head_dim, 2, has_bias=has_bias, has_key_bias=False, stages=stages)
    monkeypatch.setattr(backward, "_fits", lambda *args, **kwargs: True)   # past the up-front refusal
    bias_shape = (1, 2, 130, 200) if has_bias else None
    try:
        _lower_backward(head_dim, bias_shape, fused=True, stages=stages)
        lowered = True
    except ValueError as e:
        assert "shared memory" in str(e)
        lowered = False
    assert fits == lowered


def test_fused_backward_refuses_what_does_not_fit_and_stays_off_until_gpu_tested(monkeypatch):
    q = jnp.zeros((1, 64, 1, 128), jnp.bfloat16)
    lse = jnp.zeros((1, 1, 64), jnp.float32)
    bias = jnp.zeros((1, 1, 64, 64), jnp.bfloat16)
    with pytest.raises(ValueError, match="does not fit shared memory"):
        backward.flash_attention_sm90_bwd(q, q, q, q, lse, q, bias=bias, fused=True, interpret=True)
    # The tuner's candidates: the fused kernel only once a GPU run has passed it, and only where it fits.
    monkeypatch.setattr(backward, "SM90_FUSED_GPU_TESTED", False)
    assert all(not fused for _, fused in backward.bwd_candidates(False) + backward.bwd_candidates(True))
    monkeypatch.setattr(backward, "SM90_FUSED_GPU_TESTED", True)
    assert (2, True) in backward.bwd_candidates(False) and (2, True) in backward.bwd_candidates(True)
    seen = {}

    def spy_tuned(pass_name, q, k, bias, causal, candidates, make_run, **kwargs):
        seen[q.shape[-1], bias is not None] = candidates
        return candidates[0]

    monkeypatch.setattr(backward, "_tuned", spy_tuned)
    for d, b in ((128, None), (128, bias), (64, bias)):
        x = jnp.zeros((1, 64, 1, d), jnp.bfloat16)
        backward._backward_config(x, x, x, b, x, lse, x, False, None, 64, 64, True, True)
    assert (2, True) in seen[128, False] and (2, True) not in seen[128, True] and (2, True) in seen[64, True]


@pytest.mark.slow
def test_evoformer_block_on_the_interpreted_sm90_kernels(monkeypatch):
    """A whole Evoformer block (head_dim 32; MSA row attention with the pair bias broadcast over
    the rows, column and triangle attention, each under the rows' vmap with its key mask) with
    attention="sm90" on the interpreted kernels, bf16: outputs and every parameter and input
    gradient as close to float32 XLA attention's as the same block with bf16 XLA attention is."""
    from flax import nnx
    from sciscale_jax.models.evoformer import EvoformerBlock, EvoformerConfig
    monkeypatch.setattr(adapter, "sm90_supported", lambda: True)
    monkeypatch.setattr(adapter, "flash_attention_sm90", functools.partial(kernel.flash_attention_sm90, interpret=True))
    monkeypatch.setattr(adapter, "flash_attention_sm90_bwd",
                        functools.partial(backward.flash_attention_sm90_bwd, interpret=True))
    rows, res = 3, 20
    r = np.random.default_rng(0)
    m = jnp.asarray(r.normal(size=(1, rows, res, 16)), jnp.float32)
    z = jnp.asarray(r.normal(size=(1, res, res, 8)), jnp.float32)
    seq_mask = np.ones((1, res), np.float32)
    seq_mask[:, -3:] = 0
    msa_mask = jnp.asarray(seq_mask[:, None, :] * (r.random((1, rows, res)) > 0.15), jnp.float32)
    pair_mask = jnp.asarray(seq_mask[:, :, None] * seq_mask[:, None, :], jnp.float32)

    def outputs_and_grads(attention, dtype):
        cfg = EvoformerConfig(c_m=16, c_z=8, msa_heads=2, msa_head_dim=32, pair_heads=2, pair_head_dim=32,
                              opm_channels=4, tri_mul_channels=6, num_blocks=1, num_extra_blocks=0,
                              attention=attention, dtype=dtype)
        block = EvoformerBlock(cfg, rngs=nnx.Rngs(0))
        leaves, treedef = jax.tree.flatten(nnx.state(block, nnx.Param))
        keys = jax.random.split(jax.random.key(1), len(leaves))  # zero-initialised projections matter
        nnx.update(block, jax.tree.unflatten(treedef, [x + 0.3 * jax.random.normal(key, x.shape, x.dtype)
                                                       for x, key in zip(leaves, keys)]))

        def loss(block, m, z):
            m_out, z_out = block(m, z, msa_mask, pair_mask)
            return jnp.sum(m_out.astype(jnp.float32) ** 2) + jnp.sum(z_out.astype(jnp.float32) ** 2), (m_out, z_out)

        (_, outs), grads = nnx.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(block, m, z)
        return outs, grads

    def rel(a, b):
        la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
        num = sum(float(jnp.sum((x.astype(jnp.float32) - y.astype(jnp.float32)) ** 2)) for x, y in zip(la, lb))
        return (num / sum(float(jnp.sum(y.astype(jnp.float32) ** 2)) for y in lb)) ** 0.5

    ref, bf16, sm90 = (outputs_and_grads(a, d) for a, d in (("xla", jnp.float32), ("xla", jnp.bfloat16),
                                                             ("sm90", jnp.bfloat16)))
    for i in range(2):   # outputs, gradients
        assert rel(sm90[i], ref[i]) < 1.5 * rel(bf16[i], ref[i]) + 1e-3, (rel(sm90[i], ref[i]), rel(bf16[i], ref[i]))


# ---- compiled kernel on an sm90 GPU ---------------------------------------------------------------

needs_sm90 = pytest.mark.skipif(not kernel.sm90_supported(), reason="needs an sm90 (H100/H200) GPU")


@pytest.mark.gpu
@needs_sm90
@pytest.mark.parametrize("dtype, causal, bias_shape, head_dim, q_len, kv_len, heads, kv_heads", [
    (jnp.bfloat16, False, None, 128, 512, 512, 4, 4),
    (jnp.bfloat16, True, None, 128, 512, 512, 4, 4),
    (jnp.float16, False, None, 64, 300, 700, 4, 2),
    (jnp.bfloat16, True, None, 64, 333, 333, 4, 1),
    (jnp.bfloat16, False, (1, 4, 384, 384), 128, 384, 384, 4, 4),  # Evoformer pair bias, broadcast over batch
    (jnp.float16, True, (2, 1, 256, 256), 128, 256, 256, 4, 2),
    (jnp.bfloat16, False, (1, 4, 1, 200), 64, 130, 200, 4, 4),     # per-key bias
    (jnp.bfloat16, False, (1, 8, 256, 256), 32, 256, 256, 8, 8),   # Evoformer MSA row attention, head_dim 32
    (jnp.float16, True, None, 96, 500, 500, 4, 2),
])
def test_kernel_matches_float32_reference(dtype, causal, bias_shape, head_dim, q_len, kv_len, heads, kv_heads):
    q, k, v = _qkv((2, q_len, heads, head_dim), kv_len, kv_heads, dtype, seed=q_len + head_dim)
    bias = None
    if bias_shape is not None:
        bias = jnp.asarray(np.random.default_rng(3).normal(size=bias_shape), dtype)
    out = kernel.flash_attention_sm90(q, k, v, bias=bias, causal=causal)
    assert out.shape == q.shape and out.dtype == q.dtype
    assert bool(jnp.all(jnp.isfinite(out)))
    ref = _reference(q, k, v, bias, None, causal)
    assert _rel_err(out, ref) < 1e-2


@pytest.mark.gpu
@needs_sm90
@pytest.mark.parametrize("dtype, causal, bias_shape, head_dim, q_len, kv_len, heads, kv_heads", [
    (jnp.bfloat16, True, None, 128, 2048, 2048, 4, 4),     # more query tiles than SMs: each CTA loops
    (jnp.float16, False, None, 64, 300, 700, 4, 2),
    (jnp.bfloat16, False, (1, 8, 256, 256), 32, 256, 256, 8, 8),
])
def test_persistent_forward_matches_float32_reference(dtype, causal, bias_shape, head_dim, q_len, kv_len, heads,
                                                      kv_heads):
    q, k, v = _qkv((4, q_len, heads, head_dim), kv_len, kv_heads, dtype, seed=q_len + head_dim)
    bias = None if bias_shape is None else jnp.asarray(np.random.default_rng(3).normal(size=bias_shape), dtype)
    out = kernel.flash_attention_sm90(q, k, v, bias=bias, causal=causal, persistent=True)
    assert bool(jnp.all(jnp.isfinite(out)))
    assert _rel_err(out, _reference(q, k, v, bias, None, causal)) < 1e-2


@pytest.mark.gpu
@needs_sm90
@pytest.mark.parametrize("head_dim, mask_shape", [
    (64, (2, 1, 1, 256)),     # a key mask: the kernels' key bias
    (64, (2, 1, 256, 256)),   # any other mask joins the bias
    (32, (2, 1, 1, 256)),     # the Evoformer's head_dim with its key mask
])
@pytest.mark.parametrize("fused", [False, True])
def test_front_door_mask_and_gradients_on_gpu(head_dim, mask_shape, fused):
    q, k, v = _qkv((2, 256, 4, head_dim), 256, 4, jnp.bfloat16, seed=7)
    r = np.random.default_rng(8)
    bias = jnp.asarray(r.normal(size=(1, 4, 256, 256)), jnp.bfloat16)
    mask = jnp.asarray(r.random(mask_shape) < 0.9).at[1, :, :, :].set(False)  # batch 1: nothing to attend
    do = jnp.asarray(r.normal(size=q.shape), jnp.bfloat16)
    out, vjp = jax.vjp(lambda q, k, v, b: adapter.sm90_attention(q, k, v, bias=b, mask=mask, fused=fused),
                       q, k, v, bias)
    grads = vjp(do)
    ref_out, ref_vjp = jax.vjp(lambda q, k, v, b: _reference(q, k, v, b, mask), *(x.astype(jnp.float32)
                                                                                 for x in (q, k, v, bias)))
    ref_grads = ref_vjp(do.astype(jnp.float32))
    assert bool(jnp.all(out[1] == 0))
    assert _rel_err(out[0], ref_out[0]) < 1e-2
    for g, g_ref in zip(grads, ref_grads):
        assert g.shape == g_ref.shape
        assert _rel_err(g[0] if g.shape[0] == 2 else g, g_ref[0] if g_ref.shape[0] == 2 else g_ref) < 3e-2


@pytest.mark.gpu
@needs_sm90
@pytest.mark.parametrize("dtype, causal, bias_shape, head_dim, seq, heads, kv_heads", [
    (jnp.bfloat16, False, None, 128, 1024, 4, 4),
    (jnp.bfloat16, True, None, 128, 1000, 4, 2),
    (jnp.bfloat16, False, (1, 4, 384, 384), 64, 384, 4, 4),    # Evoformer pair bias: dbias over batch
    (jnp.float16, True, (2, 1, 1, 333), 128, 333, 4, 1),       # per-key bias: dbias over heads and q
    (jnp.bfloat16, False, (1, 8, 256, 256), 32, 256, 8, 8),    # Evoformer's head_dim 32: dbias over batch
    (jnp.bfloat16, True, None, 96, 700, 4, 4),
])
@pytest.mark.parametrize("fused", [False, True])
def test_backward_kernels_match_float64_gradients_on_gpu(dtype, causal, bias_shape, head_dim, seq, heads, kv_heads,
                                                         fused):
    if fused and not backward.fused_fits(head_dim, 2, has_bias=bias_shape is not None, has_key_bias=False,
                                         stages=2):
        pytest.skip("the fused backward does not fit shared memory here")
    q, k, v = _qkv((2, seq, heads, head_dim), seq, kv_heads, dtype, seed=seq)
    r = np.random.default_rng(11)
    bias = None if bias_shape is None else jnp.asarray(r.normal(size=bias_shape), dtype)
    do = jnp.asarray(r.normal(size=q.shape), dtype)
    out, lse2 = kernel.flash_attention_sm90(q, k, v, bias=bias, causal=causal, return_lse=True)
    grads = backward.flash_attention_sm90_bwd(q, k, v, out, lse2, do, bias=bias, causal=causal, fused=fused)
    errors = _grad_errors(grads, q, k, v, bias, do, causal=causal)
    assert max(e for e in errors if e is not None) < 2e-2, errors
