"""Packed rows: segment ids in attention, the Transformer and protein-mlm's training batches.

The property throughout: a packed row computes what each of its sequences computes alone. The
attention reference runs every segment by itself in float64 (no segment ids); the model reference
runs every protein by itself, padded, through the same model.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sciscale_jax import attention
from sciscale_jax.attention import core
from sciscale_jax.data import ProteinTokenizer, load_proteins
from sciscale_jax.data.mlm import MASKED, PACK_MIN_PIECE, MLMBatches
from sciscale_jax.kernels.flash_attention import flash_attention
from sciscale_jax.models import Transformer, TransformerConfig
from sciscale_jax.models.transformer import segment_positions

# Row 0: three segments, then padding (segment 0); row 1: two segments, no padding.
SEGMENTS = np.array([[1] * 13 + [2] * 17 + [3] * 7 + [0] * 3,
                     [5] * 25 + [9] * 15], np.int32)


def _ref_alone(q, k, v, segments, causal):
    """Each segment's attention computed by itself, in float64: [B, S, H, D]."""
    with jax.enable_x64(True):
        q, k, v = (jnp.asarray(x, jnp.float64) for x in (q, k, v))
        heads, kv_heads = q.shape[2], k.shape[2]
        k, v = (jnp.repeat(x, heads // kv_heads, axis=2) for x in (k, v))
        out = jnp.zeros(q.shape, jnp.float64)
        for b in range(q.shape[0]):
            for sid in np.unique(segments[b]):
                idx = np.nonzero(segments[b] == sid)[0]
                s = jnp.einsum("qhd,khd->hqk", q[b, idx], k[b, idx]) * q.shape[-1] ** -0.5
                if causal:
                    s = jnp.where(np.tril(np.ones((len(idx), len(idx)), bool)), s, -jnp.inf)
                p = jax.nn.softmax(s, axis=-1)
                out = out.at[b, idx].set(jnp.einsum("hqk,khd->qhd", p, v[b, idx]))
        return out


def _impl(name):
    if name == "chunked":  # tiles smaller than the segments, so segments straddle tiles
        return lambda q, k, v, seg, causal: attention.chunked_attention(
            q, k, v, segment_ids=(seg, seg), causal=causal, q_chunk=16, kv_chunk=8)
    if name == "flash":
        return lambda q, k, v, seg, causal: flash_attention(
            q, k, v, segment_ids=(seg, seg), causal=causal, block_q=16, block_k=8)
    return lambda q, k, v, seg, causal: attention.dot_product_attention(
        q, k, v, segment_ids=seg, causal=causal, impl=name)


@pytest.mark.parametrize("impl", ["xla", "chunked", "flash", "auto"])
@pytest.mark.parametrize("causal", [False, True], ids=["bidirectional", "causal"])
def test_segments_attend_only_to_themselves(impl, causal):
    rng = np.random.default_rng(0)
    b, s, heads, kv_heads, d = 2, 40, 4, 2, 16
    q = rng.normal(size=(b, s, heads, d)).astype(np.float32)
    k, v = (rng.normal(size=(b, s, kv_heads, d)).astype(np.float32) for _ in range(2))
    cot = rng.normal(size=(b, s, heads, d)).astype(np.float32)
    fn = _impl(impl)
    seg = jnp.asarray(SEGMENTS)

    def loss(fn_out):
        return lambda q, k, v: jnp.sum(fn_out(q, k, v) * cot)

    out = fn(q, k, v, seg, causal)
    grads = jax.grad(loss(lambda q, k, v: fn(q, k, v, seg, causal)), argnums=(0, 1, 2))(q, k, v)
    ref = _ref_alone(q, k, v, SEGMENTS, causal)
    with jax.enable_x64(True):
        ref_grads = jax.grad(loss(lambda q, k, v: _ref_alone(q, k, v, SEGMENTS, causal)), argnums=(0, 1, 2))(
            *(np.float64(x) for x in (q, k, v)))
    np.testing.assert_allclose(out, ref, atol=2e-5, rtol=1e-5)
    for got, want in zip(grads, ref_grads):
        np.testing.assert_allclose(got, want, atol=5e-5, rtol=1e-4)
    # the ids matter: without them, the second segment sees the rest of its row
    plain = attention.dot_product_attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), causal=causal, impl="xla")
    assert np.max(np.abs(np.asarray(plain[0, 13:30]) - np.asarray(ref[0, 13:30]))) > 1e-2


@pytest.mark.parametrize("impl", ["xla", "chunked", "flash"])
def test_query_and_key_ids_of_different_lengths(impl):
    """The pair form: queries and keys carry their own ids (a query attends keys with its id)."""
    rng = np.random.default_rng(1)
    q = rng.normal(size=(1, 12, 2, 8)).astype(np.float32)
    k, v = (rng.normal(size=(1, 20, 2, 8)).astype(np.float32) for _ in range(2))
    q_ids = np.array([[1] * 5 + [2] * 7], np.int32)
    kv_ids = np.array([[2] * 9 + [1] * 11], np.int32)
    mask = q_ids[:, None, :, None] == kv_ids[:, None, None, :]
    with jax.enable_x64(True):
        ref = attention.xla_attention(*(jnp.float64(x) for x in (q, k, v)), mask=jnp.asarray(mask))
    kw = dict(q_chunk=8, kv_chunk=8) if impl == "chunked" else dict(block_q=8, block_k=8) if impl == "flash" else {}
    fn = {"xla": lambda *a, **k: attention.dot_product_attention(*a, impl="xla", **k),
          "chunked": attention.chunked_attention, "flash": flash_attention}[impl]
    out = fn(q, k, v, segment_ids=(jnp.asarray(q_ids), jnp.asarray(kv_ids)), **kw)
    np.testing.assert_allclose(out, ref, atol=2e-5, rtol=1e-5)


def _brute_meets(q_ids, kv_ids, qb, kb):
    """Tile (i, j) holds an attended pair in some row: checked pair by pair."""
    b, q_len = q_ids.shape
    out = np.zeros((q_len // qb, kv_ids.shape[1] // kb), bool)
    for i in range(out.shape[0]):
        for j in range(out.shape[1]):
            qs, ks = q_ids[:, i * qb:(i + 1) * qb], kv_ids[:, j * kb:(j + 1) * kb]
            out[i, j] = any(np.intersect1d(qs[r], ks[r]).size for r in range(b))
    return out


def test_skipped_tiles_never_hold_an_attended_pair_and_are_all_of_them_for_rising_runs():
    from sciscale_jax.attention.chunked import _Spec, _spans, tiles_meeting
    from sciscale_jax.models.transformer import segment_runs
    rng = np.random.default_rng(3)
    skipped = 0
    for _ in range(20):
        rows = []
        for _ in range(3):  # pieces of 1..29 tokens, cut at 64, padding (id 0) after them
            row = np.repeat(np.arange(1, 13), rng.integers(1, 30, size=12))[:rng.integers(40, 65)]
            rows.append(np.pad(row, (0, 64 - len(row))))
        ids = np.stack(rows)
        runs = np.asarray(segment_runs(jnp.asarray(ids)))  # rising even with the padding's 0 at the end
        assert (np.diff(runs, axis=1) >= 0).all()
        meets = np.asarray(tiles_meeting(jnp.asarray(runs), jnp.asarray(runs), 8, 16))
        np.testing.assert_array_equal(meets, _brute_meets(runs, runs, 8, 16))
        # chunked loops over each query block's span of kv blocks: for rising ids, exactly its tiles
        spec = _Spec(q_len=64, kv_len=64, q_block=8, kv_block=16, causal=False, scale=1.0)
        first, stop = (np.asarray(x)[:, None] for x in _spans(spec, jnp.asarray(meets)))
        index = np.arange(meets.shape[1])
        np.testing.assert_array_equal((first <= index) & (index < stop), meets)
        skipped += (~meets).sum()
        # any ids (repeats far apart, unordered): a skipped tile never holds an equal pair
        wild = rng.integers(0, 5, size=(3, 16)).repeat(4, axis=1)
        meets = np.asarray(tiles_meeting(jnp.asarray(wild), jnp.asarray(wild[:, ::-1]), 16, 8))
        assert not (_brute_meets(wild, wild[:, ::-1], 16, 8) & ~meets).any()
    assert skipped > 0


@pytest.mark.parametrize("impl", ["chunked", "flash"])
@pytest.mark.parametrize("bias_rows", [3, 1], ids=["bias_per_row", "bias_shared"])
def test_tile_skipping_is_exact_for_any_ids_with_a_bias_gradient_and_a_mask(impl, bias_rows):
    """Row 0 rising runs (most tiles skipped), row 1 one id in two places far apart (they attend each
    other) and unordered ids, row 2 one id (nothing skipped); a full bias with its gradient and a key
    mask, against the float64 reference with the ids as a mask."""
    rng = np.random.default_rng(4)
    b, s, heads, d = 3, 48, 2, 8
    ids = np.stack([np.repeat([1, 2, 3, 4], [9, 20, 11, 8]),
                    np.repeat([7, 2, 7, 0, 5], [10, 10, 10, 4, 14]),
                    np.full(s, 4)]).astype(np.int32)
    q, k, v, cot = (rng.normal(size=(b, s, heads, d)).astype(np.float32) for _ in range(4))
    bias = rng.normal(size=(bias_rows, heads, s, s)).astype(np.float32)
    mask = jnp.asarray(rng.random((b, 1, 1, s)) > 0.15)
    seg = (jnp.asarray(ids), jnp.asarray(ids))
    if impl == "chunked":
        fn = lambda q, k, v, bias: attention.chunked_attention(  # noqa: E731
            q, k, v, bias=bias, mask=mask, segment_ids=seg, q_chunk=16, kv_chunk=8)
    else:
        fn = lambda q, k, v, bias: flash_attention(  # noqa: E731
            q, k, v, bias=bias, mask=mask, segment_ids=seg, block_q=16, block_k=8)
    loss = lambda f: lambda *a: jnp.sum(f(*a) * cot)  # noqa: E731
    out = fn(q, k, v, bias)
    grads = jax.grad(loss(fn), argnums=(0, 1, 2, 3))(q, k, v, bias)
    with jax.enable_x64(True):
        full = jnp.asarray(mask) & core.segment_mask(seg)

        def ref(q, k, v, bias):
            return attention.xla_attention(q, k, v, bias=bias, mask=full)
        args = [jnp.float64(x) for x in (q, k, v, bias)]
        want, want_grads = ref(*args), jax.grad(loss(ref), argnums=(0, 1, 2, 3))(*args)
    np.testing.assert_allclose(out, want, atol=2e-5, rtol=1e-5)
    for got, exp in zip(grads, want_grads):
        np.testing.assert_allclose(got, exp, atol=5e-5, rtol=1e-4)
    assert np.abs(np.asarray(grads[3])).max() > 1e-2  # the bias gradient is not trivially zero


@pytest.mark.gpu
@pytest.mark.parametrize("impl", ["flash", "chunked"])
@pytest.mark.parametrize("causal", [False, True], ids=["bidirectional", "causal"])
def test_packed_rows_compiled_on_gpu_match_the_float32_reference(impl, causal):
    """On the GPU's compiled path (Triton for flash; chunked's loops with data-dependent bounds), bf16:
    proteins packed end to end with padding (rising run numbers, most tiles skipped), unordered ids,
    one id throughout; a per-row bias with its gradient and a key mask, at the default tiles, against
    float32 attention with the ids as a mask."""
    rng = np.random.default_rng(5)
    b, s, heads, d = 3, 1000, 4, 64
    lengths = [137, 301, 64, 250, 198, 50]
    ids = np.stack([np.repeat(np.arange(1, 8), lengths + [s - sum(lengths)]),
                    rng.integers(0, 3, s),
                    np.full(s, 2)]).astype(np.int32)
    q, k, v, cot = (jnp.asarray(rng.normal(size=(b, s, heads, d)), jnp.bfloat16) for _ in range(4))
    bias = jnp.asarray(rng.normal(size=(b, heads, s, s)), jnp.bfloat16)
    mask = jnp.asarray(rng.random((b, 1, 1, s)) > 0.1)
    seg = (jnp.asarray(ids), jnp.asarray(ids))
    f32 = lambda x: x.astype(jnp.float32)  # noqa: E731

    def run(q, k, v, bias):
        if impl == "flash":
            return flash_attention(q, k, v, bias=bias, mask=mask, segment_ids=seg, causal=causal, interpret=False)
        return attention.chunked_attention(q, k, v, bias=bias, mask=mask, segment_ids=seg, causal=causal)

    def ref(q, k, v, bias):
        return attention.xla_attention(q, k, v, bias=bias, mask=mask & core.segment_mask(seg), causal=causal)
    loss = lambda f: lambda *a: jnp.sum(f32(f(*a)) * f32(cot))  # noqa: E731
    out, grads = jax.jit(run)(q, k, v, bias), jax.jit(jax.grad(loss(run), argnums=(0, 1, 2, 3)))(q, k, v, bias)
    args = [f32(x) for x in (q, k, v, bias)]
    want, want_grads = ref(*args), jax.grad(loss(ref), argnums=(0, 1, 2, 3))(*args)
    np.testing.assert_allclose(np.asarray(f32(out)), np.asarray(want), atol=2e-2, rtol=2e-2)
    for got, exp in zip(grads, want_grads):
        err = float(jnp.max(jnp.abs(f32(got) - exp)))
        assert err <= 3e-2 * max(1.0, float(jnp.max(jnp.abs(exp)))), err


def test_segment_ids_lower_to_triton_for_gpu():
    """The skipping kernels (a ``lax.cond`` per tile on the ids' ranges) pass the Pallas->Triton
    lowering, forward and both backward kernels, with a full bias whose skipped tiles write zeros."""
    from jax.sharding import AbstractDevice, AbstractMesh, AxisType
    target = AbstractMesh((1,), ("x",), axis_types=(AxisType.Auto,),
                          abstract_device=AbstractDevice(device_kind="NVIDIA H100 80GB HBM3", num_cores=None,
                                                         platform="gpu"))
    q = jax.ShapeDtypeStruct((2, 200, 4, 64), jnp.bfloat16)
    bias = jax.ShapeDtypeStruct((2, 4, 200, 200), jnp.float32)
    ids = jax.ShapeDtypeStruct((2, 200), jnp.int32)

    def loss(q, k, v, bias, ids):
        out = flash_attention(q, k, v, bias=bias, segment_ids=(ids, ids), causal=True, interpret=False,
                              backend="gpu")
        return out.astype(jnp.float32).sum()
    with jax.sharding.use_abstract_mesh(target):
        text = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3))).trace(q, q, q, bias, ids).lower(
            lowering_platforms=("cuda",)).as_text()
    assert text.count("xla.gpu.triton") == 3


def test_auto_takes_only_implementations_that_compare_ids(monkeypatch):
    """Packed rows on a GPU: "auto" skips a measured-faster implementation that would need the
    [Q, K] mask the ids stand for (cuDNN, sm90) and takes one that reads the ids per tile."""
    monkeypatch.setattr(core, "_cuda", lambda: True)
    monkeypatch.setattr(core, "_device_kind", lambda: "NVIDIA H200")
    monkeypatch.setattr(core.measured, "ranking", lambda *a, **k: ["cudnn", "sm90", "flash", "xla"])
    monkeypatch.setattr(core, "_auto_takes", lambda *a, **k: True)
    q = jax.ShapeDtypeStruct((2, 1024, 8, 64), jnp.bfloat16)
    assert core.resolve_impl(q, q, q, segments=True) == "flash"
    assert core.resolve_impl(q, q, q, segments=False) == "cudnn"


def test_auto_without_an_id_reading_kernel_on_a_gpu(monkeypatch):
    """Where flash cannot run (a jax without Pallas's Triton backend): short packed rows take the
    fastest measured kernel that accepts their mask (never cuDNN, which would take it at full
    [B, H, Q, K] size) instead of xla, which forms the same mask; from AUTO_CHUNKED_MIN_LEN
    positions chunked, which forms none."""
    monkeypatch.setattr(core, "_cuda", lambda: True)
    monkeypatch.setattr(core, "_device_kind", lambda: "NVIDIA H200")
    monkeypatch.setattr(core.measured, "ranking", lambda *a, **k: ["cudnn", "sm90", "flash", "xla"])
    seen = []

    def takes(name, q, k, v, bias, mask, causal):
        seen.append((name, None if mask is None else (tuple(mask.shape), jnp.dtype(mask.dtype))))
        return name in ("cudnn", "sm90", "xla") and not (name == "cudnn" and mask is not None)
    monkeypatch.setattr(core, "_auto_takes", takes)
    monkeypatch.setattr(core, "_accelerator", lambda: True)
    import sciscale_jax.kernels.flash_attention as flash_kernel
    monkeypatch.setattr(flash_kernel, "flash_supported", lambda *a, **k: False)
    short = jax.ShapeDtypeStruct((2, 1024, 8, 64), jnp.bfloat16)
    assert core.resolve_impl(short, short, short, segments=True) == "sm90"
    assert ("sm90", ((2, 1, 1024, 1024), jnp.dtype(bool))) in seen  # asked with the mask it will get
    long = jax.ShapeDtypeStruct((2, core.AUTO_CHUNKED_MIN_LEN, 8, 64), jnp.bfloat16)
    assert core.resolve_impl(long, long, long, segments=True) == "chunked"
    monkeypatch.setattr(core.measured, "ranking", lambda *a, **k: None)  # an unmeasured GPU kind: xla
    assert core.resolve_impl(short, short, short, segments=True) == "xla"


@pytest.mark.parametrize("backend, tiles", [("cpu", (128, 128)), ("gpu", (256, 512)), ("tpu", (256, 512))])
def test_chunked_tiles_with_ids_are_small_on_cpu_only(monkeypatch, backend, tiles):
    """With segment ids chunked's default tiles are 128 x 128 on CPU (cheap trips, more skipped) and
    its usual 256 x 512 elsewhere (an H200 ran packed rows 1.5-1.7x faster at those)."""
    from sciscale_jax.attention import chunked
    seen = []
    real = chunked._tile_map
    monkeypatch.setattr(chunked, "_tile_map",
                        lambda spec, *a: seen.append((spec.q_block, spec.kv_block)) or real(spec, *a))
    monkeypatch.setattr(jax, "default_backend", lambda: backend)
    q = jnp.zeros((1, 1024, 1, 8), jnp.float32)
    ids = jnp.asarray(np.repeat([1, 2], 512)[None], jnp.int32)
    attention.chunked_attention(q, q, q, segment_ids=(ids, ids))
    assert seen == [tiles]


@pytest.mark.parametrize("seq", [128, 4096])
def test_on_cpu_auto_never_forms_the_mask_of_a_packed_row(seq):
    q = jax.ShapeDtypeStruct((1, seq, 2, 16), jnp.float32)
    assert core.resolve_impl(q, q, q, segments=True) == "chunked"


@pytest.mark.parametrize("bad, message", [
    (np.zeros((2, 39), np.int32), r"query segment ids of shape \(2, 39\) must be \[batch, query_len\]"),
    (np.zeros((2, 40), np.float32), "segment ids must be integers"),
    ((np.zeros((2, 40), np.int32),) * 3, "one \\[batch, seq\\] array or a pair"),
])
def test_malformed_segment_ids_are_one_line(bad, message):
    q = jnp.zeros((2, 40, 2, 8))
    with pytest.raises(ValueError, match=message):
        attention.dot_product_attention(q, q, q, segment_ids=bad)


def test_positions_restart_at_each_segment():
    got = np.asarray(segment_positions(jnp.asarray(SEGMENTS)))
    np.testing.assert_array_equal(got[0], np.r_[np.arange(13), np.arange(17), np.arange(7), np.arange(3)])
    np.testing.assert_array_equal(got[1], np.r_[np.arange(25), np.arange(15)])


ESM_LIKE = TransformerConfig(vocab_size=33, num_layers=2, num_heads=4, embed_dim=32, mlp_dim=64, max_len=128,
                             norm="layer", bias=True, mlp="gelu_exact", head="esm", token_dropout_id=32)


def _packed_and_alone(cfg, pieces, seq):
    """(logits of the packed row [S, V], logits of each piece alone, padded to ``seq``, as a list)."""
    model = Transformer(cfg, rngs=nnx.Rngs(0))
    tokens = np.zeros(seq, np.int32)
    segments = np.zeros(seq, np.int32)
    pos = 0
    for i, piece in enumerate(pieces):
        tokens[pos:pos + len(piece)] = piece
        segments[pos:pos + len(piece)] = i + 1
        pos += len(piece)
    packed = model(jnp.asarray(tokens[None]), mask_bs=jnp.asarray(segments[None] > 0),
                   segments_bs=jnp.asarray(segments[None]))[0]
    alone = []
    for piece in pieces:
        row = np.zeros((1, seq), np.int32)
        row[0, :len(piece)] = piece
        mask = np.arange(seq)[None] < len(piece)
        alone.append(model(jnp.asarray(row), mask_bs=jnp.asarray(mask))[0, :len(piece)])
    return packed, alone


@pytest.mark.parametrize("cfg", [
    ESM_LIKE,
    dataclasses.replace(ESM_LIKE, attention="chunked", scan_layers=True, remat="full"),
    TransformerConfig(vocab_size=33, num_layers=2, num_heads=4, embed_dim=32, mlp_dim=64, max_len=64, causal=True),
], ids=["esm2-xla", "esm2-chunked-scan-remat", "causal-lm"])
def test_a_packed_row_computes_what_each_sequence_computes_alone(cfg):
    """Rotary positions restart, ESM-2's token-dropout share is each protein's own (the pieces
    hold different shares of mask tokens), and no token attends across a boundary."""
    rng = np.random.default_rng(2)
    pieces = [rng.integers(4, 24, n) for n in (17, 9, 26)]
    pieces[0][[3, 5, 8]] = 32   # three mask tokens in the first protein, one in the third
    pieces[2][4] = 32
    packed, alone = _packed_and_alone(cfg, pieces, 60)
    starts = np.cumsum([0] + [len(p) for p in pieces])
    for i, want in enumerate(alone):
        np.testing.assert_allclose(packed[starts[i]:starts[i + 1]], want, atol=2e-5, rtol=1e-5)


def test_packing_refuses_approximate_attention():
    from sciscale_jax.recipes.protein_mlm import ProteinMLMConfig
    with pytest.raises(ValueError, match="pack=True keeps each packed protein to itself"):
        ProteinMLMConfig(vocab_size=33, attention="linformer", pack=True)


def _batches(pack, seq_len=256, batch_size=8, seed=0, max_len=None):
    tok = ProteinTokenizer(unknown="x")
    encoded = [tok.encode(s, add_special=True) for s in load_proteins()[:400] if max_len is None or len(s) <= max_len]
    return encoded, MLMBatches(encoded, tok, batch_size=batch_size, seq_len=seq_len, seed=seed, pack=pack)


def test_packed_rows_are_whole_proteins_or_windows_of_one():
    encoded, batches = _batches(True, seq_len=1024, batch_size=4)
    proteins = {p.tobytes() for p in encoded}
    texts = [p.tobytes() for p in encoded]
    pieces = whole = 0
    for step in range(3):
        batch = batches.batch(step)
        for targets, segments in zip(batch["targets"], batch["segments"]):
            ids = segments[segments > 0]
            assert np.all(np.diff(ids) >= 0) and ids[0] == 1 and np.all(np.diff(np.unique(ids)) == 1)
            assert np.all(segments[len(ids):] == 0)         # padding only at the end ...
            assert len(segments) - len(ids) < PACK_MIN_PIECE  # ... and less than a piece
            for sid in np.unique(ids):
                piece = targets[segments == sid].astype(np.int32).tobytes()
                pieces += 1
                whole += piece in proteins
                assert any(piece in t for t in texts)          # a contiguous window of one protein
    assert whole / pieces > 0.5                                # most pieces are whole proteins


def test_packed_rows_hold_more_residues_and_the_usual_masking():
    _, padded = _batches(False)
    _, packed = _batches(True)
    real = [np.mean([b.batch(s)["mask"].mean() for s in range(5)]) for b in (padded, packed)]
    assert real[1] > 0.97 and real[1] > real[0] + 0.1
    batch = packed.batch(0)
    maskable = batch["mask"] & (batch["targets"] > 3)
    share = (batch["corruption"] == MASKED).sum() / maskable.sum()
    assert 0.09 < share < 0.15                                 # 15% chosen, 80% of those masked
    assert not np.any(batch["weights"][~batch["mask"]])        # padding is never a target


def test_packed_batches_are_a_function_of_seed_and_step_and_slice_by_rows():
    _, a = _batches(True, seed=3)
    _, b = _batches(True, seed=3)
    full = a.batch(7)
    for key, value in b.batch(7).items():
        np.testing.assert_array_equal(full[key], value)
    part = a.batch_rows(7, 3, 6)
    for key, value in part.items():
        np.testing.assert_array_equal(full[key][3:6], value)
    assert not np.array_equal(a.batch(8)["inputs"], full["inputs"])


def test_pipeline_stages_give_the_loss_of_a_packed_batch():
    """The pipeline's stage functions (embed, block arguments, head) on a packed batch equal mlm_loss."""
    from sciscale_jax.losses import mlm_loss
    from sciscale_jax.models.stack import run_layers
    from sciscale_jax.recipes.transformer_stages import block_args, embed, mlm_count, mlm_head

    _, batches = _batches(True, seq_len=128, batch_size=2, max_len=100)
    batch = {k: jnp.asarray(v) for k, v in batches.batch(0).items()}
    cfg = dataclasses.replace(ESM_LIKE, vocab_size=33, token_dropout_id=ProteinTokenizer().mask_id)
    model = Transformer(cfg, rngs=nnx.Rngs(1))
    total, count = mlm_loss(model, batch, None)
    h = run_layers(model.layers, embed(model, batch), *block_args(batch))
    np.testing.assert_allclose(mlm_head(model, h, batch), total, rtol=1e-6)
    assert float(mlm_count(batch)) == float(count)
    unpacked = mlm_loss(model, {k: v for k, v in batch.items() if k != "segments"}, None)[0]
    assert abs(float(unpacked) - float(total)) > 1e-3            # the segments changed the loss


def test_protein_mlm_trains_packed_rows_on_a_sequence_mesh_as_on_one_device(tmp_path):
    """--pack through the whole recipe: Ulysses on data=2 x sequence=2 gets the segments as a mask
    split by heads; its parameters after 3 steps equal the single-device run's."""
    from sciscale_jax import cli
    from sciscale_jax.train import train

    tiny = ["--pack", "--steps", "3", "--prefetch", "0", "--layers", "2", "--heads", "2", "--embed-dim", "16",
            "--mlp-dim", "32",
            "--seq-len", "64", "--batch-size", "4", "--eval-every", "1000", "--no-progress"]
    runs = {}
    for name, extra in (("one", []), ("mesh", ["--attention", "ulysses", "--mesh", "data=2,sequence=2"])):
        recipe, model_cfg, train_cfg = cli.build_configs(["protein-mlm", *tiny, *extra])
        assert model_cfg.pack
        runs[name] = train(recipe, model_cfg, train_cfg, tmp_path / name, progress=False, log=lambda *_: None)
    assert np.isfinite(runs["one"]["train_loss"])
    np.testing.assert_allclose(runs["mesh"]["train_loss"], runs["one"]["train_loss"], rtol=1e-5)
    for a, b in zip(jax.tree.leaves(runs["one"]["state"].params), jax.tree.leaves(runs["mesh"]["state"].params)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-5, rtol=1e-4)


def _molecules(n=50, seed=4, bos=1, eos=2):
    rng = np.random.default_rng(seed)
    return [np.r_[bos, rng.integers(3, 20, int(rng.integers(3, 15))), eos].astype(np.int32) for _ in range(n)]


def test_smiles_packed_rows_number_their_molecules():
    from sciscale_jax.data.smiles import CausalLMBatches
    from sciscale_jax.losses import causal_weights

    encoded = _molecules()
    texts = [m.tobytes() for m in encoded]
    batches = CausalLMBatches(encoded, 0, batch_size=4, seq_len=40, seed=1, pack=True, segments=True)
    batch = batches.batch(2)
    plain = CausalLMBatches(encoded, 0, batch_size=4, seq_len=40, seed=1, pack=True).batch(2)
    np.testing.assert_array_equal(plain["inputs"], batch["inputs"])   # the same rows, ids added
    assert "segments" not in plain
    for tokens, segments in zip(batch["inputs"], batch["segments"]):
        assert segments[0] == 1 and np.all(np.diff(segments) >= 0) and np.all(segments > 0)  # packed: no padding
        for sid in np.unique(segments):
            piece = tokens[segments == sid]
            assert piece[0] == 1                                               # starts at its bos
            assert any(t.startswith(piece.tobytes()) for t in texts)          # one molecule (the last cut)
    part = batches.batch_rows(2, 1, 3)
    for key in batch:
        np.testing.assert_array_equal(part[key], batch[key][1:3])
    # no next-token target across a boundary: each molecule piece of n tokens gives n - 1 targets
    weights = np.asarray(causal_weights({k: jnp.asarray(v) for k, v in batch.items()}))
    per_row = [sum(int((segs == sid).sum()) - 1 for sid in np.unique(segs)) for segs in batch["segments"]]
    np.testing.assert_array_equal(weights.sum(axis=1), per_row)


def test_isolate_molecules_needs_packed_rows_and_exact_attention():
    from sciscale_jax.recipes.smiles_lm import SmilesLMConfig
    with pytest.raises(ValueError, match="without pack each row holds one molecule"):
        SmilesLMConfig(vocab_size=104, isolate_molecules=True, pack=False)
    with pytest.raises(ValueError, match="attention='performer'"):
        SmilesLMConfig(vocab_size=104, isolate_molecules=True, attention="performer")
