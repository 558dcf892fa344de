"""benchmarks/attention_evoformer_gpu.py measures the attention calls the Evoformer block really
makes: the same shapes, bias and mask shapes, and heads as a spy on the front door records from an
EvoformerBlock's forward pass; and the script runs end to end on the CPU (xla and chunked, and its
sm90 configuration sweep on the interpreted kernels)."""

import json
import os
import sys

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from sciscale_jax import attention
from sciscale_jax.kernels import flash_attention_sm90 as sm90_kernel
from sciscale_jax.models.evoformer import EvoformerBlock, EvoformerConfig

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
import attention_evoformer_gpu as bench  # noqa: E402


def _shapes(*arrays):
    return tuple(None if x is None else tuple(x.shape) for x in arrays)


def test_the_benchmark_shapes_are_the_evoformer_calls(monkeypatch):
    n_seq, n_res = 4, 8
    seen = set()
    real = attention.dot_product_attention

    def spy(q, k, v, *, bias=None, mask=None, **kw):
        seen.add(_shapes(q, bias, mask))
        return real(q, k, v, bias=bias, mask=mask, **kw)

    monkeypatch.setattr(attention, "dot_product_attention", spy)
    cfg = EvoformerConfig(c_m=32, c_z=16, num_blocks=1, msa_dropout=0.0, pair_dropout=0.0)
    block = EvoformerBlock(cfg, rngs=nnx.Rngs(0))
    m = jnp.zeros((1, n_seq, n_res, 32))
    z = jnp.zeros((1, n_res, n_res, 16))
    block(m, z, jnp.ones((1, n_seq, n_res)), jnp.ones((1, n_res, n_res)))
    benched = set()
    for batch, seq, heads, biased in bench.shapes(n_seq, n_res).values():
        q, _, _, bias, mask, _ = bench.inputs(batch, seq, heads, biased)
        benched.add(_shapes(q, bias, mask))
    assert seen == benched, (seen, benched)
    assert len(benched) == 3   # MSA row, MSA column, triangle (starting and ending node alike)


def test_the_benchmark_runs_on_cpu_and_agrees_with_its_reference(tmp_path):
    bench.main(["--n-seq", "4", "--n-res", "16", "--impls", "xla,chunked", "--runs", "1", "--out", str(tmp_path)])
    with open(tmp_path / "attention_evoformer_gpu.json") as f:
        records = json.load(f)["records"]
    assert {(r["shape"], r["impl"], r["pass_"]) for r in records} == {
        (s, i, p) for s in ("msa_row", "msa_column", "triangle") for i in ("xla", "chunked") for p in ("fwd", "fwd+bwd")}
    # bf16 inputs against float32 attention: bf16 rounding of the outputs and gradients, not a wrong answer
    assert all(r["max_err"] < 0.1 for r in records), [(r["shape"], r["impl"], r["max_err"]) for r in records]


@pytest.mark.slow
def test_the_sm90_sweep_runs_every_configuration_in_the_interpreter(tmp_path, monkeypatch):
    """--sm90-sweep --interpret: every forward and backward configuration it times (the fused
    backward included) runs on the interpreted kernels without an error record (each run once:
    the times mean nothing in the interpreter)."""
    monkeypatch.setattr(bench, "median_seconds", lambda fn, args, runs: (jax.block_until_ready(fn(*args)), 1.0)[1])
    bench.main(["--n-seq", "2", "--n-res", "8", "--shapes", "msa_row", "--impls", "xla", "--sm90-sweep",
                "--interpret", "--runs", "1", "--out", str(tmp_path)])
    with open(tmp_path / "attention_evoformer_gpu.json") as f:
        records = json.load(f)["records"]
    swept = [r for r in records if r["impl"] == "sm90-kernel"]
    assert not [r for r in swept if "error" in r], [r for r in swept if "error" in r]
    bwd = {tuple(r["config"]) for r in swept if r["pass_"] == "bwd"}
    assert (2, "fused") in bwd and (2, "unfused") in bwd and (3, "unfused") in bwd
    fwd_configs = set(sm90_kernel.FWD_CANDIDATES[True] + sm90_kernel.FWD_CANDIDATES[False])
    assert len([r for r in swept if r["pass_"].startswith("fwd")]) == 2 * len(fwd_configs)   # with and without lse
