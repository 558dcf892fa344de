"""The sm90 kernels' block-size tuner: measures each candidate once per shape class, keeps the
fastest, skips what fails, caches to a JSON file that survives the process (and corruption);
and it can measure while the caller is being traced (the kernels run in the interpreter here)."""

import json

import jax
import jax.numpy as jnp

from sciscale_jax.kernels import flash_attention_sm90 as kernel
from sciscale_jax.kernels import flash_attention_sm90_bwd as backward
from sciscale_jax.kernels import sm90_tuning


def test_tuner_keeps_the_fastest_and_caches_it(tmp_path):
    path = str(tmp_path / "tuning.json")
    times = {(64, 2): 3.0, (128, 2): 1.0, (128, 3): 2.0}
    measured = []

    def measure(fn):
        config = fn()
        measured.append(config)
        return times[config]

    def make_run(config):
        if config == (64, 4):
            raise ValueError("shared memory exceeded")  # a configuration that does not compile
        return lambda: config

    candidates = [(64, 2), (128, 2), (128, 3), (64, 4)]
    tuner = sm90_tuning.Tuner(path, measure)
    assert tuner.best("key", candidates, make_run) == (128, 2)
    assert sorted(measured) == sorted(times)
    saved = json.load(open(path))
    assert saved["key"]["config"] == [128, 2] and set(saved["key"]["ms"]) == {"64,2", "128,2", "128,3"}

    measured.clear()
    assert sm90_tuning.Tuner(path, measure).best("key", candidates, make_run) == (128, 2)  # a new process
    assert measured == []
    # A cached choice that is no longer a candidate is measured again.
    assert sm90_tuning.Tuner(path, measure).best("key", [(64, 2), (128, 3)], make_run) == (128, 3)
    # So is a choice made before a new candidate joined (the fused backward, say).
    times[(256, 2)] = 0.5
    measured.clear()
    assert sm90_tuning.Tuner(path, measure).best("key", [(64, 2), (128, 3), (256, 2)], make_run) == (256, 2)
    assert sorted(measured) == [(64, 2), (128, 3), (256, 2)]
    # A corrupt cache file is measured again and rewritten whole.
    open(path, "w").write("{not json")
    measured.clear()
    assert sm90_tuning.Tuner(path, measure).best("key", candidates, make_run) == (128, 2)
    assert len(measured) == 3 and json.load(open(path))["key"]["config"] == [128, 2]


def test_tuning_off_and_without_an_sm90_gpu_uses_the_defaults(monkeypatch, tmp_path):
    monkeypatch.setenv("SCISCALE_SM90_TUNING", "off")
    assert sm90_tuning.default_tuner() is None
    q = jnp.zeros((1, 64, 1, 64), jnp.bfloat16)
    monkeypatch.setenv("SCISCALE_SM90_TUNING", str(tmp_path / "t.json"))
    config = kernel._forward_config(q, q, q, None, False, 0.125, 64, False)
    assert config == kernel.FWD_CANDIDATES[False][0] and not (tmp_path / "t.json").exists()


def test_tuner_measures_real_kernels_while_the_caller_is_traced(tmp_path):
    """Inside jax.jit tracing, the tuner runs the (interpreted) forward and backward kernels on
    concrete inputs of the traced shapes and caches the choice per shape class."""
    runs = []

    def measure(fn):
        out = jax.block_until_ready(fn())
        runs.append(out)
        return float(len(runs))   # the first candidate measured counts as the fastest

    tuner = sm90_tuning.Tuner(str(tmp_path / "t.json"), measure)
    fwd = [(64, 2), (128, 2)]

    @jax.jit
    def traced(q, k, v):
        assert isinstance(q, jax.core.Tracer)
        make_fwd = lambda c: (lambda: kernel._forward(*(kernel._concrete(x.shape, x.dtype, i)
                                                        for i, x in enumerate((q, k, v))), None, causal=False,
                                                      scale=0.125, block_q=64, block_kv=c[0], stages=c[1],
                                                      interpret=True))
        chosen = kernel._tuned("fwd", q, k, None, False, fwd, make_fwd, interpret=True, tuner=tuner)
        bwd = backward._backward_config(q, k, v, None, q, None, q, False, 0.125, 64, 64, False, True, tuner=tuner)
        return q * chosen[0] * bwd[0]

    q = jnp.ones((1, 64, 1, 64), jnp.bfloat16)
    assert float(traced(q, q, q)[0, 0, 0, 0]) == 64 * 3   # the first candidates: block_kv 64; 3 backward stages
    # two forward candidates and every backward one (the fused kernel's too: it fits here), each run on
    # concrete arrays
    assert len(runs) == 2 + len(backward.bwd_candidates(False)) == 5
    assert all(not isinstance(x, jax.core.Tracer) for out in runs for x in jax.tree.leaves(out))
    cache = json.load(open(tmp_path / "t.json"))
    assert len(cache) == 2 and all(key.startswith("interpret|") for key in cache)
