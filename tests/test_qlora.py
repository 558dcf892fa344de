"""QLoRA (``lora_quant="nf4"``): LoRA with the blocks' frozen dense weights stored in 4-bit NormalFloat.

The reference is ``tests/nf4_reference.py``, a float64 numpy quantiser written from the paper with
its published level table: our levels must be that table, our codes the nearest level by brute
force, and a QLoRA model must compute what a plain LoRA model computes on the weights the numpy
reference dequantises. A QLoRA run from a pretrained run starts at the loss of the pretrained
model on those weights, never moves a stored bit, and runs on a data x fsdp x tensor mesh with
ZeRO-3 as on one device (``tests/test_lora.py``, beside the LoRA runs from the same pretrained run);
its compiled step holds the frozen weights in ~4.25 bits.
"""

import jax
import jax.numpy as jnp
import numpy as np
import nf4_reference as ref
import pytest
from flax import nnx, traverse_util

from sciscale_jax.models.layers import Dense
from sciscale_jax.models.stack import is_lora, without_lora
from sciscale_jax.models.transformer import Transformer, TransformerConfig
from sciscale_jax.quant import nf4
from sciscale_jax.recipes import get_recipe
from sciscale_jax.train import TrainConfig

SHAPE = dict(vocab_size=13, num_layers=2, num_heads=2, embed_dim=32, mlp_dim=64, max_len=16)
RECIPE = get_recipe("protein-mlm")


def _flat(tree) -> dict:
    return {k: np.asarray(v) for k, v in traverse_util.flatten_dict(tree).items()}


def _params(module) -> dict:
    return _flat(nnx.to_pure_dict(nnx.state(module, nnx.Param)))


def _stored(flat: dict) -> list[tuple]:
    """The key paths of the dense layers whose kernels are stored in 4 bits."""
    return sorted(p[:-1] for p in flat if p[-1] == "kernel_nf4")


def test_levels_are_the_papers_table():
    np.testing.assert_allclose(nf4.NF4, ref.PAPER_NF4, rtol=0, atol=1e-6)
    for bits in (2, 3, 4, 5):  # NF-k: 2**k ascending levels from -1 to 1 with an exact zero
        levels = nf4.normal_float_levels(bits)
        assert len(levels) == 2 ** bits and levels[0] == -1 and levels[-1] == 1 and 0.0 in levels
        assert np.all(np.diff(levels) > 0)
        assert np.sum(levels > 0) == 2 ** (bits - 1)  # one more positive level than negative ones


@pytest.mark.parametrize("shape, block", [((3, 128), 64), ((2, 4, 96), 32), ((5, 8), 8), ((1, 64), 16)])
def test_codes_are_the_nearest_level_by_brute_force(shape, block):
    rng = np.random.default_rng(sum(shape))
    w = rng.standard_t(4, shape).astype(np.float32) * 0.05  # heavy tails, as trained weights have
    w[..., :block] = 0.0  # an all-zero block stores zeros
    codes, absmax = nf4.quantize(jnp.asarray(w), block)
    assert codes.dtype == jnp.uint8 and codes.shape == (*shape[:-1], shape[-1] // 2)
    assert absmax.shape == (*shape[:-1], shape[-1] // block)
    want, want_absmax, scaled = ref.quantize(w, block)
    got = ref.unpack(codes)
    differ = got != want
    assert not np.any(differ & ~ref.near_a_midpoint(scaled))  # only exact ties may fall either way
    assert differ.mean() < 1e-3
    np.testing.assert_array_equal(np.asarray(absmax), want_absmax.astype(np.float32))
    back = np.asarray(nf4.dequantize(codes, absmax))
    np.testing.assert_allclose(back, ref.dequantize(got, want_absmax), rtol=1e-6, atol=1e-9)
    assert np.all(back[..., :block] == 0)
    # The round trip is off by at most half the widest gap between levels times the block's absmax.
    bound = np.max(np.diff(ref.PAPER_NF4)) / 2 * np.repeat(want_absmax, block, -1)
    assert np.all(np.abs(back - w) <= bound + 1e-7)


def test_block_lengths():
    for last in (2, 8, 16, 32, 64, 96, 128, 320, 1280, 2560, 5120, 20480, 6, 50):
        for split in (False, True):
            b = nf4.block_length(last, split)
            assert b % 2 == 0 and last % b == 0 and b <= 64
            if not split:  # the largest even divisor up to the paper's 64
                assert not any(last % d == 0 and d % 2 == 0 for d in range(b + 1, 65))
    assert nf4.block_length(5120) == 64 and (5120 // 64) % 8 == 0  # 8 shards of whole blocks
    assert nf4.block_length(1280) == 40 and nf4.block_length(1280, split=False) == 64  # 1280 / 64 = 20
    with pytest.raises(ValueError, match="even last axis"):
        nf4.block_length(33)


def test_double_quantised_scales_against_the_reference():
    rng = np.random.default_rng(4)
    absmax = (np.abs(rng.normal(size=(5, 3, 40))) + 0.1).astype(np.float32)
    absmax[0, 0] = 0.7  # a row of equal scales: no spread, stored exactly
    codes, rows = nf4.double_quantize(jnp.asarray(absmax))
    want, mean, step = ref.double_quantize(absmax)
    assert codes.dtype == jnp.int8 and rows.shape == (5, 3, 2)
    np.testing.assert_allclose(np.asarray(rows), np.concatenate([mean, step], -1), rtol=1e-6, atol=1e-7)
    distance = (absmax - mean) / np.where(step > 0, step, 1.0)
    tie = np.abs(np.abs(distance - np.floor(distance)) - 0.5) < 1e-4
    assert not np.any((np.asarray(codes) != want) & ~tie) and np.abs(np.asarray(codes)).max() == 127
    back = ref.double_dequantize(np.asarray(codes), np.asarray(rows))
    assert np.all(np.abs(back - absmax) <= 0.5 * step * (1 + 1e-5) + 1e-7)
    np.testing.assert_array_equal(back[0, 0], absmax[0, 0])
    np.testing.assert_allclose(np.asarray(nf4.double_dequantize(codes, rows)), back, rtol=1e-6)


def test_store_double_quantises_as_the_reference():
    """A float kernel read into a model that double-quantises (what ``--init-from`` does):
    the reference's codes, and its scales' codes and rows."""
    like = nnx.to_pure_dict(nnx.state(Dense((32,), (512,), ("embed", "mlp"), rngs=nnx.Rngs(0),
                                            base_quant="nf4-dq"), nnx.Param))
    assert set(like) == {"kernel_nf4", "kernel_absmax_q", "kernel_absmax_dq"}
    w = np.random.default_rng(5).normal(size=(32, 512)).astype(np.float32)
    got = nf4.store({"kernel": jnp.asarray(w)}, like)
    want, absmax, scaled = ref.quantize(w, 64)
    assert not np.any((ref.unpack(got["kernel_nf4"]) != want) & ~ref.near_a_midpoint(scaled))
    codes, mean, step = ref.double_quantize(absmax.astype(np.float32))
    np.testing.assert_allclose(np.asarray(got["kernel_absmax_dq"]), np.concatenate([mean, step], -1), rtol=1e-6)
    assert np.abs(np.asarray(got["kernel_absmax_q"]).astype(np.float64) - codes).max() <= 1
    folded = nf4.pop_float(traverse_util.flatten_dict(got), ())
    weights = ref.dequantize(want, ref.double_dequantize(got["kernel_absmax_q"], got["kernel_absmax_dq"]))
    np.testing.assert_allclose(np.asarray(folded), weights, rtol=1e-6, atol=1e-6)


def _model_pair(quant="nf4", shape=SHAPE, **kw):
    """A QLoRA Transformer and the plain LoRA Transformer of the same seed (the same float kernels
    drawn), with the same random adapters."""
    q = Transformer(TransformerConfig(**shape, lora_rank=3, lora_alpha=6.0, lora_quant=quant, **kw), rngs=nnx.Rngs(0))
    plain = Transformer(TransformerConfig(**shape, lora_rank=3, lora_alpha=6.0, **kw), rngs=nnx.Rngs(0))
    for module in (q, plain):
        rng = np.random.default_rng(0)  # the same draws in the same order of paths
        for path, variable in nnx.to_flat_state(nnx.state(module, nnx.Param)):
            if path[-1] == "lora_b":
                variable.set_value(jnp.asarray(rng.normal(0, 0.3, variable.get_value().shape), jnp.float32))
    return q, plain


@pytest.mark.parametrize("scan_layers, quant", [(False, "nf4"), (True, "nf4"), (True, "nf4-dq")])
def test_a_qlora_model_computes_lora_on_the_dequantised_weights(scan_layers, quant):
    # nf4-dq: rows of at least 8 blocks double-quantise their scales (out, wi, wg, wo at 128 and 256
    # wide; the query, key and value rows end in one head's 64 channels: one block, plain scales)
    shape = SHAPE if quant == "nf4" else {**SHAPE, "embed_dim": 128, "mlp_dim": 256}
    q, plain = _model_pair(quant, shape, scan_layers=scan_layers, lora_targets="attention")
    qp, pp = _params(q), _params(plain)
    stored = _stored(qp)
    kinds = {p[-1] for p in stored}
    assert kinds == {"query", "key", "value", "out", "wi", "wg", "wo"}  # every block dense layer, adapted or not
    assert all(p + ("kernel",) not in qp for p in stored) and ("lm_head", "kernel") in qp  # the head stays float
    double = {p[-1] for p in stored if p + ("kernel_absmax_q",) in qp}
    assert double == (set() if quant == "nf4" else {"out", "wi", "wg", "wo"})
    replaced = {}
    for at in stored:
        codes = qp[at + ("kernel_nf4",)]
        absmax = qp[at + ("kernel_absmax",)] if at[-1] not in double else \
            ref.double_dequantize(qp[at + ("kernel_absmax_q",)], qp[at + ("kernel_absmax_dq",)])
        w = pp[at + ("kernel",)]
        block = w.shape[-1] // absmax.shape[-1]
        want, _, scaled = ref.quantize(w, block)  # the float kernel the same seed drew
        assert not np.any((ref.unpack(codes) != want) & ~ref.near_a_midpoint(scaled))
        replaced[at + ("kernel",)] = ref.dequantize(ref.unpack(codes), absmax).astype(np.float32)
    nnx.update(plain, nnx.State(traverse_util.unflatten_dict(replaced)))
    tokens = jnp.asarray(np.random.default_rng(1).integers(0, 13, (2, 11)))
    mask = jnp.arange(11)[None, :] < jnp.asarray([[11], [7]])
    np.testing.assert_allclose(q(tokens, mask_bs=mask), plain(tokens, mask_bs=mask), atol=2e-5, rtol=2e-5)
    # Folded for export: the adapters in the dequantised kernels, the same function.
    np.testing.assert_allclose(without_lora(q)(tokens, mask_bs=mask), plain(tokens, mask_bs=mask), atol=2e-5, rtol=2e-5)

    # The adapters' gradients are LoRA's on those weights.
    def loss(m):
        logits = m(tokens, mask_bs=mask)
        return jnp.mean(jax.nn.log_softmax(logits)[..., 0])

    lora = nnx.All(nnx.Param, lambda path, _: is_lora(path))
    grads = [_flat(nnx.to_pure_dict(nnx.grad(loss, argnums=nnx.DiffState(0, lora))(m))) for m in (q, plain)]
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) == 2 * 4 * (1 if scan_layers else 2)
    for path in grads[0]:
        np.testing.assert_allclose(grads[0][path], grads[1][path], atol=1e-6, rtol=1e-4, err_msg=str(path))


def test_frozen_storage_under_bf16():
    q = Transformer(TransformerConfig(**SHAPE, lora_rank=2, lora_quant="nf4", precision="bf16"), rngs=nnx.Rngs(0))
    for path, x in _params(q).items():
        want = {"kernel_nf4": np.uint8}.get(path[-1], np.float32 if is_lora(path) else jnp.bfloat16)
        assert x.dtype == want, path


@pytest.mark.parametrize("remat", ["full", "none"])
def test_qlora_memory_on_the_compiled_step(remat):
    """Per-device state and peak of the compiled step: the blocks' frozen kernels in 4 bits plus a
    bf16 scale per block, instead of bf16 (``benchmarks/esm2_memory.py`` reports ESM-2's sizes).
    Without remat too: a dequantised kernel is recomputed for the backward pass, not kept (kept, the
    step peaked above LoRA's: 26.1 against 26.0 MB; recomputed 16.5)."""
    from sciscale_jax.memory import estimate as mem
    from sciscale_jax.memory import report_from_analysis
    from sciscale_jax.train.abstract import abstract_run

    big = dict(num_layers=4, num_heads=4, embed_dim=256, mlp_dim=1024, max_len=64, precision="bf16",
               scan_layers=True, remat=remat, lora_rank=8)
    cfg = TrainConfig(steps=1, batch_size=2, seq_len=64)
    runs = {q: abstract_run(RECIPE, RECIPE.make_config(**big, lora_quant=q), cfg) for q in ("none", "nf4", "nf4-dq")}
    peak = {q: report_from_analysis(run.compile(analysis_only=True).memory_analysis()).peak_bytes
            for q, run in runs.items()}
    state = {q: mem.state_bytes(run) for q, run in runs.items()}
    flat = {q: traverse_util.flatten_dict(run.state.params) for q, run in runs.items()}
    kernels = sum(x.size for p, x in flat["none"].items() if p[-1] == "kernel" and p[0] == "layers")
    scales = sum(x.size for p, x in flat["nf4"].items() if p[-1] == "kernel_absmax")
    assert kernels == 4 * (4 * 256 * 256 + 3 * 256 * 1024)  # q, k, v, out; SwiGLU's wi, wg, wo
    assert scales <= kernels / 32  # at most half a bit per weight of bf16 scales
    # By hand: 2 bytes per frozen kernel weight become half a byte, plus 2 per scale; nothing else moves.
    assert state["nf4"]["params"] == state["none"]["params"] - 2 * kernels + kernels // 2 + 2 * scales
    assert {k: v for k, v in state["nf4"].items() if k != "params"} == \
        {k: v for k, v in state["none"].items() if k != "params"}
    # The compiled step holds the 4-bit kernels, not a dequantised copy of them.
    saved = state["none"]["params"] - state["nf4"]["params"]
    assert peak["none"] - peak["nf4"] > 0.8 * saved
    # Double quantisation: where a row has 8 or more blocks (out, wi, wg, wo), one byte per scale
    # plus a bf16 mean and step per row instead of a bf16 scale each; the rest as nf4 stores them
    dq = flat["nf4-dq"]
    plain = sum(x.size for p, x in dq.items() if p[-1] == "kernel_absmax")
    codes = sum(x.size for p, x in dq.items() if p[-1] == "kernel_absmax_q")
    rows = sum(x.size for p, x in dq.items() if p[-1] == "kernel_absmax_dq")
    per_row = sum(x.size // x.shape[-1] for p, x in dq.items() if p[-1] == "kernel_absmax_q")
    assert plain + codes == scales and rows == 2 * per_row and plain == 4 * 3 * 256 * 4  # q, k, v: one per row
    assert codes >= 8 * per_row  # every double-quantised row holds at least 8 scales
    assert state["nf4-dq"]["params"] == state["nf4"]["params"] - 2 * codes + codes + 2 * rows
    assert state["nf4-dq"]["params"] < state["nf4"]["params"] and peak["nf4-dq"] <= peak["nf4"]


def test_settings_qlora_cannot_honour_are_refused():
    for bad, match in (({"lora_quant": "nf4"}, "needs lora_rank > 0"),
                       ({"lora_rank": 2, "lora_quant": "int3"}, "lora_quant"),
                       ({"lora_rank": 2, "lora_quant": "nf4", "quant": "bitnet"}, "no other weight quantisation"),
                       ({"lora_rank": 2, "lora_quant": "nf4", "precision": "fp8"}, "no other weight quantisation")):
        with pytest.raises(ValueError, match=match):
            TransformerConfig(**SHAPE, **bad)
    with pytest.raises(ValueError, match="even last axis"):
        Dense((4,), (7,), ("embed", "mlp"), rngs=nnx.Rngs(0), base_quant="nf4")
