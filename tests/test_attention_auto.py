"""impl="auto" ranks by measured speed: the committed table, the nearest measured point, and the
fallback to the rules where a GPU kind or a bias kind was never measured. Runs on CPU with the
device kind and the implementations' checks patched."""

import json
import os

import jax.numpy as jnp
import pytest

from sciscale_jax.attention import core, measured
from sciscale_jax.attention.tokamax_backend import available as tokamax_available

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_committed_table_is_the_committed_benchmark():
    """measured_attention.json is exactly what the benchmark results it names give (no hand edits, no drift)."""
    table = dict(measured.load())
    sources = table.pop("sources")
    assert sources and all(path.startswith("benchmarks/results/") for path in sources)
    record_lists = []
    for path in sources:
        with open(os.path.join(ROOT, path)) as f:
            record_lists.append(json.load(f)["records"])
    assert measured.table_from_records(record_lists) == table
    rows = table["devices"]["NVIDIA H200"]
    assert len(rows) >= 8 and all(set(r["tflops"]) <= set(measured.FRONT_DOOR) for r in rows)
    assert {r["bias"] for r in rows} == {"none", "pair", "mask"}


def test_table_keeps_bias_kinds_apart():
    """A record's bias kind keys its point: "none" (or no field, as in older results) and "pair" differ."""
    base = dict(device="GPU X", head_dim=128, seq=4096, causal=False, **{"pass": "fwd+bwd"})
    table = measured.table_from_records([[
        dict(base, impl="flash", tflops=100.0),                   # no "bias" field
        dict(base, impl="cudnn", bias="none", tflops=500.0),
        dict(base, impl="sm90", bias="pair", tflops=250.0),
        dict(base, impl="flash", bias="pair", tflops=90.0),
        dict(base, impl="xla", bias="pair", tflops=1.0, **{"pass": "fwd"}),  # forward only: left out
    ]])
    rows = {r["bias"]: r["tflops"] for r in table["devices"]["GPU X"]}
    assert rows == {"none": {"cudnn": 500.0, "flash": 100.0}, "pair": {"flash": 90.0, "sm90": 250.0}}


def test_table_means_one_file_and_takes_the_later_file():
    """The Evoformer file's records ("pass_", "pair+mask" and "mask"): two shapes at one point count
    with their mean; a later file's value replaces an earlier one's, implementation by implementation."""
    base = dict(device="GPU X", head_dim=32, seq=256, causal=False, pass_="fwd+bwd")
    older = [dict(base, impl="sm90", bias="pair", **{"pass": "fwd+bwd"}, tflops=10.0),
             dict(base, impl="xla", bias="pair", **{"pass": "fwd+bwd"}, tflops=5.0)]
    newer = [dict(base, impl="sm90", bias="pair+mask", tflops=40.0),
             dict(base, impl="sm90", bias="pair+mask", tflops=30.0),
             dict(base, impl="sm90-kernel", bias="pair+mask", tflops=99.0),    # not a front-door impl
             dict(base, impl="flash", bias="mask", seq=128, tflops=20.0),
             dict(base, impl="flash", bias="mask", seq=128, tflops=20.0, pass_="fwd")]
    rows = {(r["bias"], r["seq"]): r["tflops"] for r in measured.table_from_records([older, newer])["devices"]["GPU X"]}
    assert rows == {("pair", 256): {"sm90": 35.0, "xla": 5.0}, ("mask", 128): {"flash": 20.0}}


def test_ranking_uses_the_nearest_point():
    table = {"devices": {"GPU X": [
        {"head_dim": 64, "seq": 1024, "causal": False, "bias": "none", "tflops": {"flash": 2.0, "cudnn": 1.0}},
        {"head_dim": 128, "seq": 1024, "causal": False, "bias": "none", "tflops": {"flash": 1.0, "cudnn": 3.0}},
        {"head_dim": 128, "seq": 16384, "causal": False, "bias": "none", "tflops": {"flash": 5.0, "cudnn": 4.0}},
        {"head_dim": 128, "seq": 1024, "causal": True, "bias": "none", "tflops": {"xla": 9.0}},
    ]}}
    assert measured.ranking("GPU X", 96, 2000, False, False, table) == ("cudnn", "flash")  # head_dim 128 nearer
    assert measured.ranking("GPU X", 128, 12000, False, False, table) == ("flash", "cudnn")
    assert measured.ranking("GPU X", 128, 1024, True, False, table) == ("xla",)
    assert measured.ranking("GPU X", 128, 1024, False, True, table) is None     # bias never measured
    assert measured.ranking("GPU Y", 128, 1024, False, False, table) is None    # device never measured
    # carried at most 2x in head_dim and 4x in sequence length
    assert measured.ranking("GPU X", 32, 1024, False, False, table) == ("flash", "cudnn")   # 64 is 2x away
    assert measured.ranking("GPU X", 16, 1024, False, False, table) is None
    assert measured.ranking("GPU X", 128, 256, False, False, table) == ("cudnn", "flash")   # 1024 is 4x away
    assert measured.ranking("GPU X", 128, 200, False, False, table) is None
    assert measured.ranking("GPU X", 128, 65536, False, False, table) == ("flash", "cudnn")
    assert measured.ranking("GPU X", 128, 70000, False, False, table) is None
    with pytest.raises(ValueError, match="bias='dense'"):
        measured.ranking("GPU X", 128, 1024, False, "dense", table)


def test_a_mask_alone_ranks_by_mask_points_else_by_bias_points():
    table = {"devices": {"GPU X": [
        {"head_dim": 32, "seq": 128, "causal": False, "bias": "mask", "tflops": {"flash": 4.0, "sm90": 3.0}},
        {"head_dim": 32, "seq": 256, "causal": False, "bias": "pair", "tflops": {"flash": 3.0, "sm90": 4.0}},
        {"head_dim": 128, "seq": 4096, "causal": False, "bias": "pair", "tflops": {"flash": 1.0, "tokamax": 3.0}},
    ]}}
    assert measured.ranking("GPU X", 32, 128, False, "mask", table) == ("flash", "sm90")
    assert measured.ranking("GPU X", 32, 256, False, "pair", table) == ("sm90", "flash")
    assert measured.ranking("GPU X", 32, 256, False, True, table) == ("sm90", "flash")
    # no mask point within 2x head_dim: the bias points rank it
    assert measured.ranking("GPU X", 128, 4096, False, "mask", table) == ("tokamax", "flash")
    assert measured.ranking("GPU X", 128, 4096, False, "none", table) is None


@pytest.fixture
def h200(monkeypatch):
    """A CUDA H200 as far as "auto" can tell; cuDNN takes bf16/fp16 (its own check needs a GPU)."""
    monkeypatch.setattr(core, "_cuda", lambda: True)
    monkeypatch.setattr(core, "_accelerator", lambda: True)
    monkeypatch.setattr(core, "_device_kind", lambda: "NVIDIA H200")

    def cudnn_check(q, k, v, bias=None, mask=None, causal=False):
        if q.dtype not in (jnp.bfloat16, jnp.float16):
            raise ValueError("dtype")
    monkeypatch.setattr(core, "check_cudnn", cudnn_check)
    return monkeypatch


def _inputs(dtype=jnp.bfloat16, seq=4096, head_dim=128):
    q = jnp.zeros((1, seq, 2, head_dim), dtype)
    return q, q, q


def test_auto_on_a_measured_gpu_follows_the_table(h200):
    q, k, v = _inputs()
    bias = jnp.zeros((1, 2, 4096, 4096), jnp.bfloat16)
    assert core.resolve_impl(q, k, v) == "cudnn"                  # measured 480.6 vs sm90 400.1, flash 141.1
    # causal: cuDNN 371.5 vs sm90 344.1 TFLOP/s
    assert core.resolve_impl(q, k, v, causal=True) == "cudnn"
    # pair bias: tokamax 299.6 > sm90 266.3 > flash 104.4; neither tokamax (Python 3.11) nor sm90 (no GPU) here
    assert core.resolve_impl(q, k, v, bias=bias) == "flash"
    import sciscale_jax.attention.sm90 as sm90
    h200.setattr(sm90, "sm90_supported", lambda: True)
    assert core.resolve_impl(q, k, v, bias=bias) == ("tokamax" if tokamax_available() else "sm90")
    # a short biased sequence at head_dim 128 (seq 512, 8x from the pair points at 4096): the rules
    q5, k5, v5 = _inputs(seq=512, head_dim=128)
    assert core.resolve_impl(q5, k5, v5, bias=jnp.zeros((1, 2, 512, 512), jnp.bfloat16)) == "flash"
    q5, k5, v5 = _inputs(seq=2048, head_dim=64)   # 2x away: the table's ranking
    assert core.resolve_impl(q5, k5, v5, bias=jnp.zeros((1, 2, 2048, 2048), jnp.bfloat16)) == (
        "tokamax" if tokamax_available() else "sm90")
    # The Evoformer's calls at crop 256 (head_dim 32): MSA row and triangle attention (pair bias and
    # key mask, 256 keys: sm90 42.8 > tokamax 40.4 > flash 36.7, the mean of the two shapes) and MSA
    # column attention (key mask alone, 128 keys: flash 40.9 > sm90 32.1).
    q32 = jnp.zeros((128, 256, 8, 32), jnp.bfloat16)
    row_mask = jnp.ones((128, 1, 1, 256), bool)
    assert core.resolve_impl(q32, q32, q32, bias=jnp.zeros((1, 8, 256, 256), jnp.bfloat16), mask=row_mask) == "sm90"
    qc = jnp.zeros((256, 128, 8, 32), jnp.bfloat16)
    assert core.resolve_impl(qc, qc, qc, mask=jnp.ones((256, 1, 1, 128), bool)) == "flash"
    # a mask alone at head_dim 128 (no mask-only point near): ranked by the pair-bias points
    assert core.resolve_impl(q, k, v, mask=jnp.ones((1, 1, 1, 4096), bool)) == (
        "tokamax" if tokamax_available() else "sm90")
    h200.setattr(core, "_device_kind", lambda: "NVIDIA A100")     # never measured: the rules
    assert core.resolve_impl(q, k, v) == "cudnn"
    assert core.resolve_impl(q, k, v, bias=bias) == "flash"


def test_a_small_lead_is_a_tie():
    """Within 5% the more established implementation goes first; a clear lead still wins."""
    assert measured._order({"sm90": 370.5, "cudnn": 369.4, "flash": 135.8}) == ("cudnn", "sm90", "flash")
    assert measured._order({"sm90": 400.0, "cudnn": 369.4}) == ("sm90", "cudnn")
    assert measured._order({"tokamax": 319.0, "sm90": 277.7, "flash": 104.1}) == ("tokamax", "sm90", "flash")
    assert measured._order({"flash": 100.0, "xla": 104.0, "chunked": 50.0}) == ("flash", "xla", "chunked")


def test_auto_skips_what_cannot_take_the_inputs(h200):
    """A measured ranking sm90 > cudnn > flash with a bias: cuDNN never takes a bias under auto (it
    would materialise it), sm90 only where its check passes (bf16 here, not float32)."""
    table = {"devices": {"NVIDIA H200": [
        {"head_dim": 128, "seq": 4096, "causal": False, "bias": "pair",
         "tflops": {"sm90": 300.0, "cudnn": 250.0, "flash": 150.0}}]}}
    h200.setattr(measured, "load", lambda path=None: table)
    import sciscale_jax.attention.sm90 as sm90
    h200.setattr(sm90, "sm90_supported", lambda: True)   # its input check (bf16/fp16 only) stays
    q, k, v = _inputs()
    bias = jnp.zeros((1, 2, 4096, 4096), jnp.bfloat16)
    assert core.resolve_impl(q, k, v, bias=bias) == "sm90"
    q32, k32, v32 = _inputs(jnp.float32)
    assert core.resolve_impl(q32, k32, v32, bias=bias.astype(jnp.float32)) == "flash"
    # head_dim 96 has passed on a GPU; a head dim that has not is taken only when forced
    q96, k96, v96 = _inputs(head_dim=96)
    assert core.resolve_impl(q96, k96, v96, bias=bias) == "sm90"
    from sciscale_jax.kernels import flash_attention_sm90
    h200.setattr(flash_attention_sm90, "SM90_GPU_TESTED_HEAD_DIMS", (64, 128))
    assert core.resolve_impl(q96, k96, v96, bias=bias) == "flash"
    assert core.resolve_impl(q96, k96, v96, bias=bias, impl="sm90") == "sm90"
