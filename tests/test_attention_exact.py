"""Exact attention implementations (xla, chunked, auto; cuDNN on a GPU) against a float64 reference.

The reference is the softmax-attention equation written plainly in float64; gradients of
q, k, v and bias come from autodiff of that float64 equation. Every case uses random
inputs and odd or unequal lengths.
"""

import contextlib
import functools
import io
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sciscale_jax import attention
from sciscale_jax.attention import chunked_attention, dot_product_attention


def reference_attention(q, k, v, bias, mask, causal, scale=None):
    """softmax(q k^T * scale + bias) v in float64; masked keys get weight 0, empty rows give 0."""
    with jax.enable_x64(True):
        q, k, v = (jnp.asarray(x, jnp.float64) for x in (q, k, v))
        q_len, heads, head_dim = q.shape[1:]
        kv_len, kv_heads = k.shape[1:3]
        scale = head_dim ** -0.5 if scale is None else scale
        k, v = (jnp.repeat(x, heads // kv_heads, axis=2) for x in (k, v))
        s = jnp.einsum("bqhd,bkhd->bhqk", q, k) * scale
        if bias is not None:
            s = s + jnp.asarray(bias, jnp.float64)
        valid = jnp.ones(s.shape, bool)
        if mask is not None:
            valid = valid & jnp.asarray(mask, bool)
        if causal:
            valid = valid & (np.arange(kv_len)[None, :] <= np.arange(q_len)[:, None] + kv_len - q_len)
        s = jnp.where(valid, s, -jnp.inf)
        row_max = jax.lax.stop_gradient(jnp.max(s, axis=-1, keepdims=True))
        e = jnp.where(valid, jnp.exp(s - jnp.where(jnp.isfinite(row_max), row_max, 0.0)), 0.0)
        total = e.sum(-1, keepdims=True)
        p = e / jnp.where(total > 0, total, 1.0)
        return jnp.einsum("bhqk,bkhd->bqhd", p, v)


def _inputs(rng, b, q_len, kv_len, heads, kv_heads, head_dim):
    q = rng.normal(size=(b, q_len, heads, head_dim))
    k = rng.normal(size=(b, kv_len, kv_heads, head_dim))
    v = rng.normal(size=(b, kv_len, kv_heads, head_dim))
    return q, k, v


def _value_and_grads(fn, q, k, v, bias, cot, dtype):
    """Output and d<out, cot>/d(q, k, v, bias) of fn, with inputs cast to dtype."""
    args = [jnp.asarray(x, dtype) for x in (q, k, v)] + [None if bias is None else jnp.asarray(bias, dtype)]
    argnums = (0, 1, 2, 3) if bias is not None else (0, 1, 2)

    def loss(q, k, v, bias):
        out = fn(q, k, v, bias)
        return jnp.sum(out * jnp.asarray(cot, out.dtype)), out

    grads, out = jax.jit(jax.grad(loss, argnums, has_aux=True))(*args)
    return out, grads


def _reference_value_and_grads(q, k, v, bias, mask, causal, cot):
    """Float64 output and gradients of the reference, as NumPy arrays."""
    with jax.enable_x64(True):
        out, grads = _value_and_grads(
            lambda q, k, v, b: reference_attention(q, k, v, b, mask, causal), q, k, v, bias, cot, jnp.float64)
        assert out.dtype == jnp.float64
        return np.asarray(out), [np.asarray(g) for g in grads]


def assert_matches_reference(impl_fn, q, k, v, bias=None, mask=None, causal=False, atol=2e-5):
    rng = np.random.default_rng(7)
    cot = rng.normal(size=q.shape)
    ref_out, ref_grads = _reference_value_and_grads(q, k, v, bias, mask, causal, cot)
    run = lambda q, k, v, b: impl_fn(q, k, v, bias=b, mask=mask, causal=causal)  # noqa: E731
    out, grads = _value_and_grads(run, q, k, v, bias, cot, jnp.float32)
    np.testing.assert_allclose(np.asarray(out), ref_out, atol=atol, rtol=1e-4)
    for name, g, g_ref in zip(("dq", "dk", "dv", "dbias"), grads, ref_grads):
        assert g.shape == g_ref.shape, name
        assert np.all(np.isfinite(np.asarray(g))), name
        np.testing.assert_allclose(np.asarray(g), g_ref, atol=atol * 5, rtol=1e-4, err_msg=name)
    return np.asarray(out)


IMPLS = {
    "xla": functools.partial(dot_product_attention, impl="xla"),
    "chunked": functools.partial(dot_product_attention, impl="chunked"),
    "chunked_4x3": functools.partial(chunked_attention, q_chunk=4, kv_chunk=3),
    "chunked_5x8": functools.partial(chunked_attention, q_chunk=5, kv_chunk=8),
}
SLOW = pytest.mark.slow
# Cases that need several blocks to mean anything; the xla reference is re-checked under -m slow.
TILED = [pytest.param("xla", marks=SLOW), "chunked_4x3"]


@pytest.mark.parametrize("impl", ["xla", "chunked", "chunked_4x3", pytest.param("chunked_5x8", marks=SLOW)])
def test_plain_odd_lengths(impl):
    q, k, v = _inputs(np.random.default_rng(0), 2, 13, 11, 3, 3, 8)
    assert_matches_reference(IMPLS[impl], q, k, v)


@pytest.mark.parametrize("impl", TILED)
@pytest.mark.parametrize("kv_heads,q_len,kv_len", [(2, 17, 17), (1, 7, 12), (2, 12, 7)])
def test_gqa_causal(impl, kv_heads, q_len, kv_len):
    q, k, v = _inputs(np.random.default_rng(1), 2, q_len, kv_len, 4, kv_heads, 8)
    assert_matches_reference(IMPLS[impl], q, k, v, causal=True)


@pytest.mark.parametrize("impl", TILED)
@pytest.mark.parametrize("bias_shape", ["BHQK", "1HQK", "B11K", "QK"])
def test_bias_patterns_gradient_in_bias_shape(impl, bias_shape):
    b, q_len, kv_len, heads = 2, 9, 13, 3
    sizes = dict(B=b, H=heads, Q=q_len, K=kv_len, **{"1": 1})
    rng = np.random.default_rng(2)
    q, k, v = _inputs(rng, b, q_len, kv_len, heads, heads, 8)
    bias = rng.normal(size=tuple(sizes[c] for c in bias_shape))
    mask = rng.random((b, 1, q_len, kv_len)) > 0.25
    assert_matches_reference(IMPLS[impl], q, k, v, bias=bias, mask=mask)


@pytest.mark.parametrize("impl", ["xla", "chunked_4x3"])
def test_evoformer_pair_bias_shared_across_msa_rows(impl):
    # Row-wise gated self-attention of an MSA: batch = 5 MSA rows of one protein with 11 residues;
    # one pair bias [1, H, R, R] shared by every row, a per-row padding mask [S, 1, 1, R].
    msa_rows, res, heads = 5, 11, 2
    rng = np.random.default_rng(3)
    q, k, v = _inputs(rng, msa_rows, res, res, heads, heads, 4)
    pair_bias = rng.normal(size=(1, heads, res, res))
    mask = np.ones((msa_rows, 1, 1, res), bool)
    mask[3, ..., 8:] = False  # a shorter row
    assert_matches_reference(IMPLS[impl], q, k, v, bias=pair_bias, mask=mask)


@pytest.mark.parametrize("impl", ["xla", "chunked_4x3"])
def test_fully_masked_rows_give_zeros_and_finite_grads(impl):
    b, q_len, kv_len, heads = 2, 7, 10, 2
    rng = np.random.default_rng(4)
    q, k, v = _inputs(rng, b, q_len, kv_len, heads, 1, 8)
    mask = rng.random((b, heads, q_len, kv_len)) > 0.3
    mask[0, 1, 2, :] = False   # one row of one head
    mask[1, :, :, :] = False   # a whole batch element
    bias = rng.normal(size=(b, heads, q_len, kv_len))
    out = assert_matches_reference(IMPLS[impl], q, k, v, bias=bias, mask=mask, causal=True)
    assert np.all(out[0, 2, 1] == 0.0) and np.all(out[1] == 0.0)


def _temp_bytes(fn, seq_len, heads=2, head_dim=32):
    spec = jax.ShapeDtypeStruct((1, seq_len, heads, head_dim), jnp.float32)
    step = jax.jit(jax.grad(lambda q, k, v: fn(q, k, v).sum(), (0, 1, 2)))
    return step.lower(spec, spec, spec).compile().memory_analysis().temp_size_in_bytes


def test_chunked_memory_grows_linearly_while_xla_grows_quadratically():
    lengths = [256, 512, 1024]
    chunked = [_temp_bytes(functools.partial(chunked_attention, q_chunk=64, kv_chunk=64), n) for n in lengths]
    xla = [_temp_bytes(attention.xla_attention, n) for n in lengths]
    slope = lambda ys: np.polyfit(np.log(lengths), np.log(ys), 1)[0]  # noqa: E731
    assert slope(chunked) <= 1.15, chunked
    assert slope(xla) >= 1.5, xla
    assert chunked[-1] * 8 <= xla[-1], (chunked, xla)


def test_auto_resolves_by_backend_and_length():
    short = jax.ShapeDtypeStruct((1, 64, 2, 8), jnp.float32)
    long = jax.ShapeDtypeStruct((1, attention.AUTO_CHUNKED_MIN_LEN, 2, 8), jnp.float32)
    if jax.default_backend() == "cpu":
        assert attention.resolve_impl(short, short, short) == "xla"
        assert attention.resolve_impl(long, long, long) == "chunked"
        assert attention.resolve_impl(short, long, long) == "chunked"
    assert attention.resolve_impl(short, short, short, impl="xla") == "xla"


def test_auto_on_cuda_prefers_cudnn_without_bias_or_mask(monkeypatch):
    """The rule the H200 timings chose: cuDNN when it applies and nothing must be materialised
    at [B, H, Q, K]; the flash kernel with a bias or mask or where cuDNN refuses the inputs."""
    from sciscale_jax.attention import core, cudnn
    monkeypatch.setattr(core, "_cuda", lambda: True)
    monkeypatch.setattr(core, "_accelerator", lambda: True)
    monkeypatch.setattr(cudnn, "_gpu_compute_capability", lambda: 9.0)
    bf16 = jax.ShapeDtypeStruct((1, 64, 2, 64), jnp.bfloat16)
    f32 = jax.ShapeDtypeStruct((1, 64, 2, 64), jnp.float32)
    odd = jax.ShapeDtypeStruct((1, 63, 2, 64), jnp.bfloat16)
    bias = jax.ShapeDtypeStruct((1, 2, 64, 64), jnp.bfloat16)
    mask = jax.ShapeDtypeStruct((1, 1, 1, 64), jnp.bool_)
    assert attention.resolve_impl(bf16, bf16, bf16) == "cudnn"
    assert attention.resolve_impl(bf16, bf16, bf16, causal=True) == "cudnn"
    assert attention.resolve_impl(odd, bf16, bf16, causal=True) == "flash"  # cuDNN: odd non-square causal
    assert attention.resolve_impl(f32, f32, f32) == "flash"                 # cuDNN: no float32
    assert attention.resolve_impl(bf16, bf16, bf16, bias=bias) == "flash"
    assert attention.resolve_impl(bf16, bf16, bf16, mask=mask) == "flash"


def _arr(*shape, dtype=jnp.float32):
    return jnp.asarray(np.random.default_rng(5).normal(size=shape), dtype)


@pytest.mark.parametrize("args,kwargs,match", [
    ((_arr(1, 4, 2, 8), _arr(1, 4, 2, 6), _arr(1, 4, 2, 6)), {}, r"head_dim mismatch.*\(1, 4, 2, 8\).*\(1, 4, 2, 6\)"),
    ((_arr(1, 4, 3, 8), _arr(1, 4, 2, 8), _arr(1, 4, 2, 8)), {}, "kv_heads=2 does not divide heads=3"),
    ((_arr(1, 4, 2, 8), _arr(1, 5, 2, 8), _arr(1, 5, 2, 8)), {"bias": _arr(1, 2, 4, 4)},
     r"bias of shape \(1, 2, 4, 4\) does not broadcast to .* \(1, 2, 4, 5\)"),
    ((_arr(1, 4, 2, 8), _arr(1, 5, 2, 8), _arr(1, 5, 2, 8)), {"mask": jnp.ones((3, 1, 1, 5), bool)},
     r"mask of shape \(3, 1, 1, 5\)"),
    ((_arr(1, 4, 2, 8), _arr(1, 4, 2, 8), _arr(1, 4, 2, 8)), {"mask": jnp.ones((1, 1, 1, 4), jnp.int32)},
     "mask must be boolean.*int32"),
    ((_arr(1, 4, 2, 8), _arr(1, 4, 2, 8, dtype=jnp.bfloat16), _arr(1, 4, 2, 8)), {},
     "one floating dtype; got float32, bfloat16, float32"),
    ((_arr(1, 4, 2, 8), _arr(1, 4, 2, 8), _arr(1, 4, 2, 8)), {"impl": "cudnn"},
     "cudnn' takes float16 or bfloat16 inputs; got float32"),
    ((_arr(1, 4, 2, 8), _arr(1, 4, 2, 8), _arr(1, 4, 2, 8)), {"impl": "nope"}, "unknown attention implementation 'nope'"),
    ((_arr(1, 4, 2, 8), _arr(1, 4, 2, 8), _arr(1, 4, 2, 8)), {"impl": "performer"}, "PerformerAttention"),
])
def test_bad_input_raises_value_error_naming_values(args, kwargs, match):
    with pytest.raises(ValueError, match=match):
        dot_product_attention(*args, **kwargs)


def test_chunk_size_must_be_positive():
    q = _arr(1, 4, 2, 8)
    with pytest.raises(ValueError, match="q_chunk must be a positive int, got 0"):
        chunked_attention(q, q, q, q_chunk=0)


def test_config_names_accepted():
    for name in ("xla", "chunked", "cudnn", "auto", "linformer", "performer"):
        assert attention.validate_impl(name) == name


@pytest.mark.gpu
@pytest.mark.parametrize("causal,q_len,kv_len", [(False, 64, 64), (True, 64, 96)])
def test_cudnn_matches_reference_on_gpu(causal, q_len, kv_len):
    rng = np.random.default_rng(6)
    q, k, v = _inputs(rng, 2, q_len, kv_len, 4, 2, 64)
    bias = rng.normal(size=(1, 4, q_len, kv_len))
    mask = rng.random((2, 1, 1, kv_len)) > 0.2
    cot = rng.normal(size=q.shape)
    ref_out, ref_grads = _reference_value_and_grads(q, k, v, bias, mask, causal, cot)
    run = jax.jit(lambda q, k, v, b: dot_product_attention(q, k, v, bias=b, mask=mask, causal=causal, impl="cudnn"))
    out, grads = _value_and_grads(run, q, k, v, bias, cot, jnp.bfloat16)
    np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(ref_out), atol=3e-2, rtol=3e-2)
    for g, g_ref in zip(grads, ref_grads):
        assert g.shape == g_ref.shape
        np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(g_ref), atol=8e-2, rtol=5e-2)


# --- the xla reference's custom VJP: x64, dtypes, residuals and memory --------------------------

@pytest.mark.parametrize("causal,kv_heads,bias_shape", [(True, 1, (1, 4, 9, 13)), (False, 2, (2, 1, 1, 13))])
def test_xla_under_x64_matches_reference(causal, kv_heads, bias_shape):
    """float32 inputs with jax_enable_x64 on: same answers, float32 outputs and gradients."""
    rng = np.random.default_rng(8)
    q, k, v = _inputs(rng, 2, 9, 13, 4, kv_heads, 6)
    bias = rng.normal(size=bias_shape)
    mask = rng.random((2, 1, 9, 13)) > 0.3
    mask[1, 0, 4] = False  # one fully masked row
    with jax.enable_x64(True):
        assert_matches_reference(IMPLS["xla"], q, k, v, bias=bias, mask=mask, causal=causal)
        out = IMPLS["xla"](*(jnp.asarray(x, jnp.float32) for x in (q, k, v)), causal=causal)
        assert out.dtype == jnp.float32


def test_xla_float64_inputs_are_exact_to_float64():
    """float64 inputs run in float64 throughout (no float32 accumulation): 1e-12 of the reference."""
    rng = np.random.default_rng(9)
    q, k, v = _inputs(rng, 1, 7, 10, 2, 1, 4)
    bias = rng.normal(size=(1, 2, 7, 10))
    mask = rng.random((1, 1, 7, 10)) > 0.2
    cot = rng.normal(size=q.shape)
    ref_out, ref_grads = _reference_value_and_grads(q, k, v, bias, mask, True, cot)
    with jax.enable_x64(True):
        run = lambda q, k, v, b: attention.xla_attention(q, k, v, bias=b, mask=mask, causal=True)  # noqa: E731
        out, grads = _value_and_grads(run, q, k, v, bias, cot, jnp.float64)
        assert out.dtype == jnp.float64 and all(g.dtype == jnp.float64 for g in grads)
    np.testing.assert_allclose(np.asarray(out), ref_out, atol=1e-12, rtol=1e-12)
    for g, g_ref in zip(grads, ref_grads):
        np.testing.assert_allclose(np.asarray(g), g_ref, atol=1e-12, rtol=1e-10)


def test_xla_bfloat16_keeps_dtypes_and_tracks_reference():
    rng = np.random.default_rng(10)
    q, k, v = _inputs(rng, 2, 11, 11, 4, 2, 8)
    bias = rng.normal(size=(1, 4, 11, 11))
    cot = rng.normal(size=q.shape)
    ref_out, ref_grads = _reference_value_and_grads(q, k, v, bias, None, True, cot)
    run = lambda q, k, v, b: attention.xla_attention(q, k, v, bias=b, causal=True)  # noqa: E731
    out, grads = _value_and_grads(run, q, k, v, bias, cot, jnp.bfloat16)
    assert out.dtype == jnp.bfloat16 and all(g.dtype == jnp.bfloat16 for g in grads)
    np.testing.assert_allclose(np.asarray(out, np.float32), ref_out, atol=3e-2, rtol=3e-2)
    for g, g_ref in zip(grads, ref_grads):
        scale = np.abs(g_ref).max()
        assert np.abs(np.asarray(g, np.float32) - g_ref).max() <= 3e-2 * scale


def _quadratic_residuals(fn, b, q_len, kv_len, heads, kv_heads=None, policy=None):
    """(dtype, shape, note) of each residual autodiff keeps that holds b*heads*q_len*kv_len elements."""
    q = jnp.ones((b, q_len, heads, 8), jnp.float32)  # float32 also under global x64
    k = jnp.ones((b, kv_len, kv_heads or heads, 8), jnp.float32)
    f = lambda q, k, v: fn(q, k, v).sum()  # noqa: E731
    if policy is not None:
        from sciscale_jax import remat
        f = jax.checkpoint(f, policy=remat.checkpoint_policy(policy))
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        jax.ad_checkpoint.print_saved_residuals(f, q, k, k)
    kept = []
    for line in out.getvalue().splitlines():  # e.g. "f32[2,4,12,12] named 'attn_probs' from ..."
        m = re.match(r"\s*(\w+)(<\w+>)?\[([\d,]*)\](.*)", line)
        if m:
            shape = tuple(int(n) for n in m.group(3).split(",") if n)
            if np.prod(shape) == b * heads * q_len * kv_len:
                kept.append((m.group(1), shape, (m.group(2) or "") + m.group(4)))
    return kept


def test_xla_backward_keeps_one_probability_tensor():
    """Backward keeps one float32 [B,H,Q,K] tensor (the probabilities), named attn_probs: no logits,
    no masked copies, no boolean [B,H,Q,K] mask, whatever mask, bias and causal flag are given."""
    b, q_len, kv_len, heads = 2, 12, 12, 4
    mask = jnp.asarray(np.random.default_rng(11).random((b, 1, 1, kv_len)) > 0.2)
    bias = jnp.ones((1, heads, q_len, kv_len), jnp.float32)
    fn = lambda q, k, v: attention.xla_attention(q, k, v, bias=bias, mask=mask, causal=True)  # noqa: E731
    kept = _quadratic_residuals(fn, b, q_len, kv_len, heads, kv_heads=2)
    assert [(d, s) for d, s, _ in kept] == [("f32", (b, heads, q_len, kv_len))], kept
    assert "attn_probs" in kept[0][2], kept


@pytest.mark.parametrize("policy,expected", [("selective", 0), ("full", 0), ("custom:attn_probs=save", 1),
                                             ("custom:attn_logits=save", 1), ("offload:attn_probs", 1)])
def test_xla_checkpoint_names_steer_remat(policy, expected):
    """Remat policies see the attn_logits / attn_probs names inside the custom VJP."""
    fn = lambda q, k, v: attention.xla_attention(q, k, v, causal=True)  # noqa: E731
    kept = _quadratic_residuals(fn, 1, 10, 10, 2, policy=policy)
    assert len(kept) == expected, kept
    if policy.startswith("offload"):  # moved to host memory by a device_put
        assert kept[0][2].startswith("<host>"), kept
    elif expected:
        assert policy.split(":")[1].split("=")[0] in kept[0][2], kept


def _plain_attention(q, k, v):
    """Causal einsum-softmax-einsum attention left to autodiff: the baseline of the memory test."""
    t = q.shape[1]
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) * q.shape[-1] ** -0.5
    logits = jnp.where(jnp.tril(jnp.ones((t, t), bool)), logits, jnp.finfo(jnp.float32).min)
    return jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(logits, axis=-1), v)


def _stack_temp_bytes(attn, layers=3, t=256, heads=2, d=16):
    """Temporaries of grad through a stack of attention calls (no remat), from the compiled analysis."""
    def loss(x, ws):
        for w in ws:
            q = jnp.einsum("bthd,de->bthe", x, w)
            x = x + attn(q, x, x)
        return jnp.sum(x * x)

    x = jax.ShapeDtypeStruct((1, t, heads, d), jnp.float32)
    ws = [jax.ShapeDtypeStruct((d, d), jnp.float32)] * layers
    return jax.jit(jax.grad(loss, argnums=(0, 1))).lower(x, ws).compile().memory_analysis().temp_size_in_bytes


def test_xla_training_memory_not_above_plain_attention():
    """Issue 11 item 9: the compiled no-remat backward of a stack of reference attentions keeps
    no more temporaries than plain einsum-softmax-einsum attention left to autodiff (within 1.1x).
    The full-size train-step comparison is a row of benchmarks/activation_memory.py."""
    xla = _stack_temp_bytes(lambda q, k, v: attention.xla_attention(q, k, v, causal=True))
    plain = _stack_temp_bytes(_plain_attention)
    assert xla <= 1.1 * plain, (xla, plain)
