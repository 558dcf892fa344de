"""memory.estimate and the planner against XLA's compiled memory analysis of the real train step.

The reference for every memory figure is the compiled step itself (``train.abstract.abstract_run``:
the loop's step builder, placement and jit shardings, compiled with the loop's XLA options), or
for the parameter bytes the concretely built model.
"""

import dataclasses

import jax
import numpy as np
import pytest
from flax import nnx

from sciscale_jax import cli
from sciscale_jax.memory import plan as planner
from sciscale_jax.memory import report_from_analysis
from sciscale_jax.recipes import get_recipe
from sciscale_jax.train import TrainConfig
from sciscale_jax.train.abstract import abstract_run
from sciscale_jax.train.estimate import estimate
from sciscale_jax.train.plan import plan

TINY = dict(num_layers=3, embed_dim=32, num_heads=2, mlp_dim=96)


def _configs(recipe_name, model_kw, train_kw):
    recipe = get_recipe(recipe_name)
    model_cfg = recipe.make_config(**model_kw)
    train_cfg = TrainConfig(**{**recipe.train_defaults, **train_kw})
    return recipe, model_cfg, train_cfg


def _compiled_peak(recipe, model_cfg, train_cfg) -> int:
    return report_from_analysis(abstract_run(recipe, model_cfg, train_cfg).compile().memory_analysis()).peak_bytes


@pytest.mark.parametrize("recipe_name,model_kw,train_kw", [
    ("protein-mlm", dict(TINY, remat="full", num_layers=4), dict(batch_size=8, seq_len=32, mesh="data=4,tensor=2",
                                                                 zero=1)),
    pytest.param("msa-evoformer", dict(c_m=16, c_z=8, msa_heads=2, msa_head_dim=8, pair_heads=2, pair_head_dim=4,
                                       opm_channels=4, tri_mul_channels=8, num_blocks=3, num_seq=8),
                 dict(batch_size=8, seq_len=16, mesh="data=8", zero=3), marks=pytest.mark.slow),  # ~4 min on 2 busy cores
])
def test_estimate_within_10_percent_of_the_compiled_step(recipe_name, model_kw, train_kw):
    recipe, model_cfg, train_cfg = _configs(recipe_name, model_kw, train_kw)
    est = estimate(recipe, model_cfg, train_cfg)
    compiled = _compiled_peak(recipe, model_cfg, train_cfg)
    assert abs(est.peak_bytes / compiled - 1) < 0.10, (est.format(), compiled)
    depth = model_kw.get("num_layers", model_kw.get("num_blocks"))
    assert est.num_layers == depth and len(est.compiled_probes) == 2
    assert max(d for d, _ in est.compiled_probes) < depth  # probed shallower than the run


def test_state_bytes_match_the_built_model():
    """One device: parameter bytes = the concrete model's; Adam keeps two float32 moments per parameter."""
    recipe, model_cfg, train_cfg = _configs("protein-mlm", TINY, dict(batch_size=2, seq_len=16))
    model = recipe.build_model(model_cfg, nnx.Rngs(0))
    leaves = jax.tree.leaves(nnx.state(model, nnx.Param))
    n_params = sum(int(np.prod(x.shape)) for x in leaves)
    est = estimate(recipe, model_cfg, train_cfg, method="trace")
    assert est.params_bytes == est.grads_bytes == 4 * n_params
    assert 8 * n_params <= est.opt_state_bytes <= 8 * n_params + 1024  # mu, nu (+ counts)
    # ZeRO-3 over 8 devices: a 1/8 share of every leaf that divides, whole copies of the rest
    _, _, t8 = _configs("protein-mlm", TINY, dict(batch_size=8, seq_len=16, mesh="data=8", zero=3))
    z3 = estimate(recipe, model_cfg, t8, method="trace")
    whole = sum(4 * int(np.prod(x.shape)) for x in leaves if not any(d % 8 == 0 for d in x.shape))
    assert z3.params_bytes >= 4 * n_params / 8 and z3.params_bytes <= 4 * n_params / 8 + whole


def test_parse_bytes():
    assert planner.parse_bytes("80GiB") == 80 * 2 ** 30
    assert planner.parse_bytes("80GB") == 80 * 10 ** 9
    assert planner.parse_bytes("1.5 MiB") == int(1.5 * 2 ** 20)
    for bad in ("abc", "-3GiB", "0", "12XB"):
        with pytest.raises(ValueError, match="memory="):
            planner.parse_bytes(bad)


def _fixed_plan(budget):
    recipe, model_cfg, train_cfg = _configs("protein-mlm", dict(TINY, remat="full", attention="xla"),
                                            dict(batch_size=8, seq_len=32))
    fixed = {"mesh": "data=8", "remat": "full", "attention": "xla", "precision": "fp32", "grad_accum": 1,
             "offload": ""}
    return recipe, model_cfg, train_cfg, plan(recipe, model_cfg, train_cfg, devices=8, budget=budget,
                                                      fixed=fixed, top=2)


def test_plan_respects_the_budget_and_its_top_plan_compiles_within_it():
    recipe, model_cfg, train_cfg = _configs("protein-mlm", dict(TINY, remat="full"), dict(batch_size=8, seq_len=32))
    zero0 = _compiled_peak(recipe, model_cfg, dataclasses.replace(train_cfg, mesh="data=8"))
    budget = int(zero0 * 0.8)  # ZeRO 0 does not fit: the planner must shard the state
    _, _, _, plans = _fixed_plan(budget)
    best = plans[0]
    assert best.zero >= 1 and best.predicted is not None and best.predicted.peak_bytes <= budget
    assert all(p.peak_bytes <= budget for p in plans)
    compiled = _compiled_peak(recipe, dataclasses.replace(model_cfg, remat=best.remat),
                              dataclasses.replace(train_cfg, mesh=best.mesh, zero=best.zero))
    assert compiled <= budget * 1.02, (compiled, budget)


def test_nothing_fits_names_the_smallest_peak_and_what_dominates():
    with pytest.raises(ValueError, match=r"nothing fits .* smallest peak found is .* dominated by"):
        _fixed_plan(4096)


def test_cli_plan_errors_are_one_line(capsys):
    assert cli.main(["plan", "protein-mlm", "--devices", "8", "--memory", "lots"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "memory='lots'" in err
    assert cli.main(["plan", "protein-mlm", "--memory", "1GiB"]) == 2  # --devices missing
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "--devices" in err
    assert cli.main(["plan", "protein-mlm", "--devices", "64", "--memory", "1GiB"]) == 2  # more than JAX sees
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "devices=64" in err


def test_saved_residual_bytes_by_both_routes():
    """jax's residual list and the parsed public printout agree, and match a hand count:
    d/dw sum(sin(x @ w)) keeps cos(x @ w) (float32 [3, 7]) and, for the bf16 branch,
    the bf16 [3, 7] tanh output's derivative input; arguments are not counted."""
    import jax.numpy as jnp

    from sciscale_jax.memory.estimate import _printed_residual_bytes, saved_residual_bytes

    def f(w, x):
        return jnp.sum(jnp.sin(x @ w))

    w, x = jax.ShapeDtypeStruct((5, 7), jnp.float32), jax.ShapeDtypeStruct((3, 5), jnp.float32)
    assert saved_residual_bytes(f, w, x) == _printed_residual_bytes(f, w, x) == 3 * 7 * 4

    def g(w, x):
        h = jnp.tanh(x @ w).astype(jnp.bfloat16)
        return jnp.sum(jnp.sin(h.astype(jnp.float32) @ w.T))

    assert saved_residual_bytes(g, w, x) == _printed_residual_bytes(g, w, x) > 3 * 7 * 4


def test_adafactor_zero1_and_offload_state_bytes():
    """ZeRO-1 shards Adafactor's factored moments too (they have another rank than their
    parameter); offloaded optimizer state leaves the device parts and is listed apart."""
    recipe, model_cfg, t0 = _configs("protein-mlm", TINY, dict(batch_size=8, seq_len=16, mesh="data=8",
                                                               optimizer="adafactor"))
    base = estimate(recipe, model_cfg, t0, method="trace")
    z1 = estimate(recipe, model_cfg, dataclasses.replace(t0, zero=1), method="trace")
    assert z1.opt_state_bytes < base.opt_state_bytes and z1.params_bytes == base.params_bytes
    off = estimate(recipe, model_cfg, dataclasses.replace(t0, offload="opt_state"), method="trace")
    assert off.opt_state_bytes == 0 and off.offloaded_bytes == base.opt_state_bytes
    assert off.peak_bytes == base.peak_bytes - base.opt_state_bytes


def test_enumeration_offers_dap_and_pipeline_meshes_where_supported():
    plain = {m for m, _ in planner.candidate_meshes(8)}
    assert not any("dap" in m or "pipeline" in m for m in plain)
    dap = {m for m, _ in planner.candidate_meshes(8, dap=True)}
    assert {"data=4,dap=2", "data=2,dap=4", "dap=8"} <= dap
    pipe = {(m, z) for m, z in planner.candidate_meshes(8, pipeline_layers=6)}
    assert ("pipeline=2,data=4", 1) in pipe and not any("pipeline=4" in m or "pipeline=8" in m for m, _ in pipe)
    assert all(z in planner.PIPELINE_ZERO for m, z in pipe if "pipeline" in m)
