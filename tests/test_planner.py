"""memory.estimate and the planner against XLA's compiled memory analysis of the real train step.

The reference for every memory figure is the compiled step itself (``train.abstract.abstract_run``:
the loop's step builder, placement and jit shardings, compiled with the loop's XLA options), or
for the parameter bytes the concretely built model.
"""

import contextlib
import dataclasses
import io
import math
import re

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
from sciscale_jax.train.plan import plan_configs as train_plan_configs

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


def test_analysis_only_compile_keeps_the_memory_analysis():
    """The planner's probes compile without LLVM's optimisation passes (``analysis_only``): every
    figure of the memory analysis equals the loop's own compile of the same step."""
    recipe, model_cfg, train_cfg = _configs("protein-mlm", dict(TINY, num_layers=2, remat="selective"),
                                            dict(batch_size=8, seq_len=32, mesh="data=4,tensor=2", zero=1))
    run = abstract_run(recipe, model_cfg, train_cfg)
    plain = report_from_analysis(run.compile().memory_analysis())
    quick = report_from_analysis(run.compile(analysis_only=True).memory_analysis())
    assert dataclasses.replace(quick, generated_code_bytes=0) == dataclasses.replace(plain, generated_code_bytes=0)
    assert quick.peak_bytes > 0


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


_SHORT = re.compile(r"^(?:(bool)|key<\w*>|([a-z]+?)(\d+))\[([\d,]*)\]")


def _printed_residual_bytes(fn, *args, skip=("from the argument",)) -> int:
    """Residual bytes read from the lines jax's public ``print_saved_residuals`` prints
    (``f32[8,32] from ...``), arguments (and lines with any ``skip`` text) left out: an
    independent route to the same figure."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        jax.ad_checkpoint.print_saved_residuals(fn, *args)
    total = 0
    for line in out.getvalue().splitlines():
        m = _SHORT.match(line.strip())
        assert m is not None, line
        if any(text in line for text in skip):
            continue
        size = 1 if m.group(1) else 8 if line.startswith("key<") else int(m.group(3)) // 8
        total += size * math.prod(int(d) for d in m.group(4).split(",") if d)
    return total


def test_gradient_profile_residuals_and_flops_by_hand():
    """d/dw sum(sin(x @ w)) keeps cos(x @ w) (float32 [3, 7]); its FLOPs are the forward product
    and the weight gradient's, 2 x 3 x 5 x 7 each (x is not differentiated). Under
    jax.checkpoint the backward pass recomputes x @ w: a third product."""
    import jax.numpy as jnp

    from sciscale_jax.memory.estimate import gradient_profile

    def f(w, x):
        return jnp.sum(jnp.sin(x @ w))

    product = 2 * 3 * 5 * 7
    w, x = jax.ShapeDtypeStruct((5, 7), jnp.float32), jax.ShapeDtypeStruct((3, 5), jnp.float32)
    assert gradient_profile(f, w, x) == (3 * 7 * 4, 2 * product)
    assert _printed_residual_bytes(f, w, x) == 3 * 7 * 4
    saved, flops = gradient_profile(jax.checkpoint(f), w, x)
    assert saved == 0 and flops == 3 * product  # only the arguments are kept

    def g(w, x):  # a scan of 4 steps: each step's products count 4 times
        h = jnp.tanh(x @ w).astype(jnp.bfloat16)
        out, _ = jax.lax.scan(lambda c, _: (jnp.sin(c.astype(jnp.float32) @ w.T @ w).astype(jnp.bfloat16), None),
                              h, None, length=4)
        return jnp.sum(out.astype(jnp.float32))

    saved, flops = gradient_profile(g, w, x)
    assert saved > 3 * 7 * 4
    # per step: two products forward, and for each a gradient for its input and one for w
    assert flops == 2 * product + 4 * 3 * 2 * product


def test_gradient_profile_on_the_models():
    """On the Transformer and the Evoformer the residual bytes equal jax's printout; the FLOPs are
    within 10% of XLA's cost analysis of the gradient program (which adds elementwise work) and
    do not change with the precision (bf16 runs the same products)."""
    from sciscale_jax.train.abstract import abstract_batch, abstract_model
    from sciscale_jax.memory.estimate import gradient_profile

    for name, kw, tkw in [("protein-mlm", dict(TINY, remat="full"), dict(batch_size=1, seq_len=32)),
                          ("msa-evoformer", dict(c_m=16, c_z=8, msa_heads=2, msa_head_dim=8, pair_heads=2,
                                                 pair_head_dim=4, opm_channels=4, tri_mul_channels=8, num_blocks=2,
                                                 num_seq=8), dict(batch_size=1, seq_len=16))]:
        recipe, model_cfg, train_cfg = _configs(name, kw, tkw)
        flops = {}
        for precision in ("fp32", "bf16"):
            cfg = dataclasses.replace(model_cfg, precision=precision)
            graphdef, params, rest, _, _ = abstract_model(recipe, cfg)
            batch = abstract_batch(recipe, cfg, train_cfg)

            def loss(p, b):
                total, count = recipe.loss_fn(nnx.merge(graphdef, p, rest), b, jax.random.key(0))
                return total / count

            saved, flops[precision] = gradient_profile(loss, params, batch)
            # jax's printout differentiates every argument: stop the batch's gradient, and leave out
            # the stopped batch itself (an argument of the step, not a residual)
            fixed_batch = lambda p, b: loss(p, jax.lax.stop_gradient(b))  # noqa: E731
            printed = _printed_residual_bytes(fixed_batch, params, batch,
                                              skip=("from the argument", "output of stop_gradient"))
            assert saved == printed, (name, precision)
            if precision == "fp32":
                xla = jax.jit(jax.grad(loss)).lower(params, batch).cost_analysis()["flops"]
                assert 0.9 < flops[precision] / xla < 1.1, (name, flops[precision], xla)
        assert flops["fp32"] == flops["bf16"], name


def test_eval_shape_module_builds_the_same_model_and_draws_the_same_keys():
    """``eval_shape_module`` builds the same abstract model as ``nnx.eval_shape`` (graph, shapes,
    dtypes), and the count it keeps draws the same keys: a model built concretely under it has
    the same parameters, bit for bit, as one built without it."""
    from sciscale_jax.train.abstract import _whole_count_updates, eval_shape_module

    recipe, model_cfg, _ = _configs("protein-mlm", TINY, dict(batch_size=2, seq_len=16))
    build = lambda: recipe.build_model(model_cfg, nnx.Rngs(3))  # noqa: E731
    a, b = eval_shape_module(build), nnx.eval_shape(build)
    ga, sa = nnx.split(a)
    gb, sb = nnx.split(b)
    assert ga == gb
    assert jax.tree.map(lambda x: (x.shape, x.dtype), sa) == jax.tree.map(lambda x: (x.shape, x.dtype), sb)
    with _whole_count_updates():
        fast = nnx.state(build(), nnx.Param)
    plain = nnx.state(build(), nnx.Param)
    assert all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(fast), jax.tree.leaves(plain), strict=True))
    assert nnx.RngStream.__call__ is not None and "draw" not in nnx.RngStream.__call__.__name__  # restored


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


def test_best_first_walk_orders_as_a_full_screen_and_traces_less():
    """The planner's walk (lower bounds resolved on demand) yields every valid mix in the order a
    full screen sorted by rank gives, with the same figures; with a budget the fastest mix fits,
    ``plan`` traces fewer residual profiles than the full screen needs."""
    from sciscale_jax.memory import estimate as mem
    from sciscale_jax.train import plan as train_plan

    recipe, model_cfg, train_cfg = _configs("protein-mlm", TINY, dict(batch_size=8, seq_len=32))
    fixed = {"offload": "", "zero": 1}
    settings = planner.enumerate_settings(train_cfg, 8, fixed)
    hw = planner.Hardware()

    def tools():
        precisions = sorted({s["precision"] for s in settings}, key=lambda p: p == "fp32")
        return train_plan._Profiles(recipe, model_cfg, train_cfg, precisions), train_plan._States(recipe)

    profiles, states = tools()
    full = []
    for s in settings:
        try:
            cfg, tc = train_plan.plan_configs(model_cfg, train_cfg, s)
            train_plan._check(recipe, cfg, tc)
            state = states(cfg, tc)
        except ValueError:
            continue
        prof = profiles(s["remat"], s["attention"], s["precision"])
        carry = profiles("full", s["attention"], s["precision"])["layer"]
        seconds, flops, comm = planner.step_time(s, state, prof["flops"], carry, mem.depth_of(cfg), tc, hw)
        parts = planner.screened_parts(s, state, prof, tc, 4)
        full.append(planner.Plan(s["mesh"], s["zero"], s["remat"], s["attention"], s["precision"], s["grad_accum"],
                                 s["offload"], parts, seconds, flops, comm))
    full.sort(key=train_plan._rank)
    profiles, states = tools()
    walked = list(train_plan._ranked(recipe, model_cfg, train_cfg, settings, profiles, states, hw, []))
    key = lambda p: (train_plan._rank(p), sorted(p.settings().items()))  # noqa: E731
    assert [train_plan._rank(p) for p in walked] == [train_plan._rank(p) for p in full]
    assert sorted(map(key, walked)) == sorted(map(key, full)) and len(walked) > 50
    assert len({p.remat for p in walked}) == 3 and len({p.precision for p in walked}) == 2

    traced = []
    original = train_plan._Profiles._measure
    try:
        train_plan._Profiles._measure = lambda self, *k: traced.append(k) or original(self, *k)
        top = plan(recipe, model_cfg, train_cfg, devices=8, budget=2 ** 40, fixed=fixed, top=3, confirm=False)
    finally:
        train_plan._Profiles._measure = original
    assert top[0].settings() == full[0].settings()
    assert len(set(traced)) < 12, traced  # 3 remat x 2 attention x 2 precision
    # each mix listed once: its fewest accumulation steps, the next plans are other mixes
    mixes = [train_plan._mix(p) for p in top]
    assert len(set(mixes)) == 3
    expected = []
    for p in full:
        if train_plan._mix(p) not in [train_plan._mix(q) for q in expected]:
            expected.append(p)
    assert [p.settings() for p in top] == [p.settings() for p in expected[:3]]


def test_pipeline_schedules_are_enumerated_and_priced():
    """On pipeline meshes the planner chooses the schedule too: ZB-H1's bubble, (p-1)/(3m+p-1) of
    the step, makes it faster than 1F1B and GPipe (bubble (p-1)/(m+p-1)); GPipe keeps all m
    microbatches in flight, 1F1B-type schedules at most p."""
    _, _, tc = _configs("protein-mlm", TINY, dict(batch_size=16, seq_len=32, microbatches=8))
    settings = planner.enumerate_settings(tc, 8, {"remat": "none", "attention": "xla", "precision": "bf16",
                                                  "grad_accum": 1, "offload": ""}, pipeline_layers=4)
    by_mesh = {}
    for s in settings:
        by_mesh.setdefault(s["mesh"], set()).add(s["pipeline_schedule"])
    assert by_mesh["pipeline=2,data=4"] == set(planner.PLAN_SCHEDULES) and by_mesh["data=8"] == {""}
    fixed = planner.enumerate_settings(tc, 8, {"pipeline_schedule": "gpipe"}, pipeline_layers=4)
    assert {s["pipeline_schedule"] for s in fixed if "pipeline" in s["mesh"]} == {"gpipe"}

    state = {"params": 1000, "grads": 1000, "opt_state": 2000}
    profile = {"base": 10.0, "layer": 100.0, "recompute": 0.0, "depth": 4}
    hw = planner.Hardware(flops=1e12, link_bandwidth=1e30, host_bandwidth=1e30)
    p, m = 2, 8
    times, acts = {}, {}
    for schedule in planner.PLAN_SCHEDULES:
        s = {"mesh": "pipeline=2,data=4", "zero": 0, "remat": "none", "attention": "xla", "precision": "bf16",
             "grad_accum": 1, "offload": "", "pipeline_schedule": schedule}
        cfg = dataclasses.replace(tc, mesh=s["mesh"], pipeline_schedule=schedule)
        times[schedule] = planner.step_time(s, state, 1e9, 0.0, 4, cfg, hw)[0]
        acts[schedule] = planner.screened_parts(s, state, profile, cfg, 4)["activations"]
    work = 1e9 * (16 // 4) / p / 1e12  # per device: 4 examples, half the layers
    assert times["1f1b"] == pytest.approx(work * (m + p - 1) / m)
    assert times["gpipe"] == pytest.approx(times["1f1b"])
    assert times["zbh1"] == pytest.approx(work * (3 * m + p - 1) / (3 * m))
    micro = 4 / m
    assert acts["gpipe"] == int(micro * (10 + m * 100 * 4 / p))
    assert acts["1f1b"] == acts["zbh1"] == int(micro * (10 + p * 100 * 4 / p))


def test_cli_plan_prints_commands_that_parse(capsys, monkeypatch):
    """The printed ``sciscale train`` line is ready to run: boolean model flags come out as
    ``--scan-layers`` (not ``--scan-layers True``), and the chosen pipeline schedule is in it;
    ``--verify`` compiles that plan, schedule included (it compiled the default 1F1B before)."""
    from sciscale_jax.train import abstract

    argv = ["--scan-layers", "--layers", "4", "--embed-dim", "32", "--heads", "2", "--mlp-dim", "96",
            "--batch-size", "8", "--seq-len", "32", "--mesh", "pipeline=2,data=4", "--zero", "0", "--remat", "none",
            "--attention", "xla", "--precision", "fp32", "--grad-accum", "1", "--offload", ""]
    compiled = []
    real = abstract.abstract_run
    monkeypatch.setattr(abstract, "abstract_run", lambda r, m, t: compiled.append((m, t)) or real(r, m, t))
    assert cli.main(["plan", "protein-mlm", "--devices", "8", "--memory", "1GiB", "--no-confirm", "--top", "1",
                     "--verify", *argv]) == 0
    out = capsys.readouterr().out
    line = next(x for x in out.splitlines() if x.strip().startswith("sciscale train"))
    assert "--scan-layers --" in line + " --" and "True" not in line
    _, model_cfg, train_cfg = cli.build_configs(line.split()[2:])
    assert model_cfg.scan_layers and train_cfg.mesh == "pipeline=2,data=4"
    assert train_cfg.pipeline_schedule == "zbh1"  # the smallest bubble at equal memory
    assert "verify (plan 1 compiled" in out
    verified_model, verified = compiled[-1]
    assert verified.pipeline_schedule == "zbh1" and verified.mesh == train_cfg.mesh
    assert verified_model.scan_layers and verified_model.remat == model_cfg.remat


def test_cli_plan_keeps_a_switch_given_as_none(monkeypatch, capsys):
    """``--chunk-size none`` fixes the switch at None (no chunking); left out, the planner picks
    it. argparse defaults of None made the two the same before, so the planner could chunk
    against the user's flag."""
    from sciscale_jax.train import plan as train_plan

    seen = []

    def fake_plan(recipe, model_cfg, train_cfg, *, fixed, **kw):
        seen.append((fixed, model_cfg))
        raise ValueError("stop here")

    monkeypatch.setattr(train_plan, "plan", fake_plan)
    for extra in (["--chunk-size", "none"], ["--chunk-size", "16"], []):
        assert cli.main(["plan", "msa-evoformer", "--devices", "1", "--memory", "1GiB", *extra]) == 2
        assert "stop here" in capsys.readouterr().err
    (given_none, cfg_none), (given_16, cfg_16), (left_out, _) = seen
    assert "chunk_size" in given_none and given_none["chunk_size"] is None and cfg_none.chunk_size is None
    assert given_16["chunk_size"] == 16 and cfg_16.chunk_size == 16
    assert "chunk_size" not in left_out and "remat" not in left_out


def test_evoformer_chunking_and_module_remat_are_chosen_only_where_needed():
    """The Evoformer's own switches (chunk size, sub-module remat) join the enumeration: with room
    to spare the top plan leaves them off (equal modelled time: the cheaper values win); with a
    budget of 80% of the compiled peak without them (the plain mix's estimate is about 90% of it,
    chunk size 8 about 74%), the top plan turns one on, its printed flags parse back to it, and
    its own compiled step fits. One block: the probes trace two and three anyway."""
    evo = dict(c_m=16, c_z=8, msa_heads=2, msa_head_dim=8, pair_heads=2, pair_head_dim=4, opm_channels=4,
               tri_mul_channels=8, num_blocks=1, num_seq=8)
    recipe, model_cfg, train_cfg = _configs("msa-evoformer", evo, dict(batch_size=2, seq_len=32))
    fixed = {"remat": "none", "attention": "xla", "precision": "fp32", "grad_accum": 1, "offload": ""}
    roomy = plan(recipe, model_cfg, train_cfg, devices=1, budget=2 ** 40, fixed=fixed, top=1, confirm=False)
    assert roomy[0].model_switches == (("chunk_size", None), ("remat_modules", False))
    budget = int(0.8 * _compiled_peak(recipe, model_cfg, train_cfg))  # the plain mix does not fit
    best = plan(recipe, model_cfg, train_cfg, devices=1, budget=budget, fixed=fixed, top=1)[0]
    assert best.predicted is not None and best.peak_bytes <= budget
    switches = dict(best.model_switches)
    assert switches["chunk_size"] is not None or switches["remat_modules"]
    _, parsed, _ = cli.build_configs(["msa-evoformer", *" ".join(best.flags()).split()])
    assert (parsed.chunk_size, parsed.remat_modules) == (switches["chunk_size"], switches["remat_modules"])
    cfg, tc = train_plan_configs(model_cfg, train_cfg, best.settings())
    assert (cfg.chunk_size, cfg.remat_modules) == (switches["chunk_size"], switches["remat_modules"])
    assert _compiled_peak(recipe, cfg, tc) <= budget


def test_a_rollouts_per_step_remat_is_planned_from_the_step_it_rebuilds():
    """weather-vit's ``train_rollout_remat`` joins the enumeration for a multi-step rollout (not for
    one step): the screen of the checkpointed mix counts the one step its backward pass rebuilds
    (before, it counted the kept step inputs alone: 13 MiB screened against 159 compiled at the
    defaults), so it stays within the planner's 30% of the compiled estimate; with room the top plan
    leaves it off, with 80% of the plain rollout's compiled peak it turns it on and fits."""
    flags = ["--lat", "8", "--lon", "24", "--patch-size", "4", "--layers", "2", "--heads", "2", "--embed-dim", "32",
             "--mlp-dim", "64", "--batch-size", "8", "--train-rollout", "3"]
    recipe, model_cfg, train_cfg = cli.build_configs(["weather-vit", *flags])
    fixed = {"remat": "none", "attention": "xla", "precision": "fp32", "grad_accum": 1, "offload": ""}
    roomy = plan(recipe, model_cfg, train_cfg, devices=1, budget=2 ** 40, fixed=fixed, top=1, confirm=False)
    assert roomy[0].model_switches == (("train_rollout_remat", False),)
    screened = plan(recipe, model_cfg, train_cfg, devices=1, budget=2 ** 40, top=1, confirm=False,
                    fixed={**fixed, "train_rollout_remat": True})[0]
    budget = int(0.8 * _compiled_peak(recipe, model_cfg, train_cfg))
    best = plan(recipe, model_cfg, train_cfg, devices=1, budget=budget, fixed=fixed, top=1)[0]
    assert dict(best.model_switches) == {"train_rollout_remat": True} and best.peak_bytes <= budget
    assert abs(screened.screen_bytes / best.predicted.peak_bytes - 1) < 0.3, (screened.screen_bytes, best.predicted)
    cfg, tc = train_plan_configs(model_cfg, train_cfg, best.settings())
    assert cfg.train_rollout_remat and _compiled_peak(recipe, cfg, tc) <= budget
    assert "--train-rollout-remat" in best.flags()
    one_step = dataclasses.replace(model_cfg, train_rollout=1)
    assert plan(recipe, one_step, train_cfg, devices=1, budget=2 ** 40, fixed=fixed, top=1,
                confirm=False)[0].model_switches == ()
