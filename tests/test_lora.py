"""LoRA fine-tuning (``lora_rank``): adapters on the Transformer's dense layers, everything else frozen.

The references are independent of the adapter code: a plain Transformer whose weights are the
merged W + (alpha / r) A B, computed in numpy (outputs), and the chain rule through that merged
weight (gradients of A and B from the gradient of W). A LoRA run must leave every frozen weight
bit for bit as it started, keep optimizer state for the adapters alone, start from a pretrained
run's or an ESM-2 checkpoint's loss exactly, and run on a data x fsdp x tensor mesh with ZeRO-3
as on one device. Settings LoRA cannot honour are refused in one line before compiling.
"""

import dataclasses
import json

import jax
import jax.numpy as jnp
import nf4_reference as ref
import numpy as np
import optax
import pytest
from flax import nnx, traverse_util

from sciscale_jax.models.stack import Techniques, is_lora
from sciscale_jax.models.transformer import Transformer, TransformerConfig
from sciscale_jax.recipes import get_recipe, load_run
from sciscale_jax.train import TrainConfig, train

SHAPE = dict(vocab_size=13, num_layers=2, num_heads=2, embed_dim=16, mlp_dim=32, max_len=16)
RECIPE = get_recipe("protein-mlm")
MODEL = RECIPE.make_config(num_layers=2, num_heads=2, embed_dim=32, mlp_dim=64, max_len=64)
QUIET = dict(progress=False, log=lambda *_: None)


def _flat(module, kind=nnx.Param) -> dict:
    return {k: np.asarray(v) for k, v in traverse_util.flatten_dict(nnx.to_pure_dict(nnx.state(module, kind))).items()}


def _merged_model(lora: Transformer) -> Transformer:
    """A Transformer without adapters whose kernels are the LoRA model's W + scale * A B (numpy)."""
    cfg = lora.config
    plain = Transformer(TransformerConfig(**{**SHAPE, "mlp": cfg.mlp}), rngs=nnx.Rngs(1))
    weights = _flat(lora)
    merged = {}
    for path, value in weights.items():
        if is_lora(path):
            continue
        if path[-1] == "kernel" and path[:-1] + ("lora_a",) in weights:
            a, b = weights[path[:-1] + ("lora_a",)], weights[path[:-1] + ("lora_b",)]
            r = a.shape[-1]
            delta = a.reshape(-1, r).astype(np.float64) @ b.reshape(r, -1).astype(np.float64)
            value = (value.astype(np.float64) + cfg.lora_scale * delta.reshape(value.shape)).astype(np.float32)
        merged[path] = value
    nnx.update(plain, nnx.State(traverse_util.unflatten_dict(merged)))
    return plain


def _random_adapters(model: Transformer, seed: int = 0) -> None:
    """Give every LoRA factor B (zero when new) random values, so the adapters change the output."""
    rng = np.random.default_rng(seed)
    for path, variable in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        if path[-1] == "lora_b":
            variable.set_value(jnp.asarray(rng.normal(0, 0.3, variable.get_value().shape), jnp.float32))


@pytest.mark.parametrize("targets", ["attention", "all"])
def test_adapters_equal_the_merged_weight(targets):
    tokens = jnp.asarray(np.random.default_rng(1).integers(0, 13, (2, 11)))
    mask = jnp.arange(11)[None, :] < jnp.asarray([[11], [7]])
    model = Transformer(TransformerConfig(**SHAPE, lora_rank=3, lora_alpha=6.0, lora_targets=targets),
                        rngs=nnx.Rngs(0))
    fresh = model(tokens, mask_bs=mask)
    assert jnp.array_equal(fresh, _merged_model(model)(tokens, mask_bs=mask))  # B = 0: the base model exactly
    _random_adapters(model)
    out, ref = model(tokens, mask_bs=mask), _merged_model(model)(tokens, mask_bs=mask)
    np.testing.assert_allclose(out, ref, atol=2e-5, rtol=2e-5)
    assert float(jnp.max(jnp.abs(out - fresh))) > 0.1  # the adapters do change the output
    adapted = {p[-2] for p in _flat(model) if p[-1] == "lora_a"}
    assert adapted == ({"query", "key", "value", "out"} | ({"wi", "wg", "wo"} if targets == "all" else set()))


def test_adapter_gradients_are_the_chain_rule_through_the_merged_weight():
    tokens = jnp.asarray(np.random.default_rng(2).integers(0, 13, (2, 9)))
    model = Transformer(TransformerConfig(**SHAPE, lora_rank=2, lora_alpha=3.0), rngs=nnx.Rngs(0))
    _random_adapters(model, seed=3)
    scale = model.config.lora_scale

    def loss(m):
        return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(m(tokens), tokens))

    grads = traverse_util.flatten_dict(nnx.to_pure_dict(nnx.grad(loss)(model)))
    plain = _merged_model(model)
    plain_grads = traverse_util.flatten_dict(nnx.to_pure_dict(nnx.grad(loss)(plain)))
    weights = _flat(model)
    checked = 0
    for path in weights:
        if path[-1] != "lora_a":
            continue
        kernel = path[:-1] + ("kernel",)
        a, b = weights[path], weights[path[:-1] + ("lora_b",)]
        r = a.shape[-1]
        g = np.asarray(plain_grads[kernel], np.float64).reshape(a.size // r, -1)  # dL/dW of the merged model
        want_a = scale * g @ b.reshape(r, -1).T.astype(np.float64)
        want_b = scale * a.reshape(-1, r).T.astype(np.float64) @ g
        tol = 1e-4 * max(np.abs(want_a).max(), np.abs(want_b).max())
        np.testing.assert_allclose(np.asarray(grads[path]).reshape(want_a.shape), want_a, atol=tol)
        np.testing.assert_allclose(np.asarray(grads[path[:-1] + ("lora_b",)]).reshape(want_b.shape), want_b, atol=tol)
        checked += 1
    assert checked == 8  # q, k, v, out in each of 2 layers


def test_frozen_weights_are_stored_in_the_compute_dtype():
    model = Transformer(TransformerConfig(**SHAPE, lora_rank=2, precision="bf16"), rngs=nnx.Rngs(0))
    dtypes = {p: v.dtype for p, v in _flat(model).items()}
    assert all(d == (np.float32 if is_lora(p) else jnp.bfloat16) for p, d in dtypes.items())


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    run = tmp_path_factory.mktemp("lora") / "pretrained"
    train(RECIPE, MODEL, TrainConfig(steps=3, batch_size=8, seq_len=32, save_every=3, eval_every=100, log_every=1,
                                     warmup_steps=1, seed=1), run, **QUIET)
    return run


def _first_loss(run) -> float:
    return next(json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()
                if json.loads(line).get("step") == 1 and "loss" in json.loads(line))


def _params(run) -> dict:
    return traverse_util.flatten_dict(jax.tree.map(np.asarray, nnx.to_pure_dict(
        nnx.state(load_run(run, log=lambda *_: None).model, nnx.Param))))


@pytest.mark.parametrize("mesh, zero, optimizer", [("", 0, "adamw"), ("data=2,fsdp=2,tensor=2", 3, "adamw"),
                                                   ("", 0, "mezo")])
def test_a_lora_run_trains_the_adapters_alone(pretrained, tmp_path, mesh, zero, optimizer):
    lora = RECIPE.make_config(**{**MODEL.to_dict(), "lora_rank": 4, "lora_targets": "all"})
    cfg = TrainConfig(steps=3, batch_size=8, seq_len=32, save_every=3, eval_every=100, log_every=1, warmup_steps=1,
                      seed=7, init_from=str(pretrained), mesh=mesh, zero=zero, optimizer=optimizer,
                      learning_rate=1e-2)
    result = train(RECIPE, lora, cfg, tmp_path / "tuned", **QUIET)
    # The first step's loss is the pretrained model's on that batch: the new adapters add exactly 0.
    batch = RECIPE.build_data(cfg, lora).train.batch(0)
    total, count = RECIPE.loss_fn(load_run(pretrained, log=lambda *_: None).model, jax.tree.map(np.asarray, batch),
                                  None)
    if optimizer != "mezo":  # (MeZO logs the loss at the parameters before its update too, but perturbs first)
        assert _first_loss(tmp_path / "tuned") == pytest.approx(float(total) / float(count), rel=1e-5)
    before, after = _params(pretrained), _params(tmp_path / "tuned")
    frozen = [p for p in after if not is_lora(p)]
    assert set(frozen) == set(before)
    assert all(np.array_equal(before[p], after[p]) for p in frozen)  # not one bit of a frozen weight moved
    adapters = [p for p in after if p[-1] == "lora_b"]
    assert len(adapters) == 2 * 7 and all(np.abs(after[p]).max() > 0 for p in adapters)  # B left zero: trained
    # Optimizer state for the adapters alone: AdamW's two moments (MeZO: its seed, nothing per parameter).
    n_lora = sum(after[p].size for p in after if is_lora(p))
    state = result["state"]
    opt_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state.opt_state) if x.ndim > 0)
    assert opt_bytes == 2 * 4 * n_lora if optimizer == "adamw" else opt_bytes < 64
    if mesh:  # ZeRO-3: the frozen matrices stay split over the devices
        matrices = [x for p, x in traverse_util.flatten_dict(state.params).items() if x.ndim == 2 and not is_lora(p)]
        assert matrices and all(x.addressable_shards[0].data.size < x.size for x in matrices)


def test_a_lora_step_on_a_mesh_equals_one_device(tmp_path):
    lora = RECIPE.make_config(**{**MODEL.to_dict(), "lora_rank": 4})
    runs = {}
    for mesh, zero in (("", 0), ("data=2,fsdp=2,tensor=2", 3)):
        cfg = TrainConfig(steps=2, batch_size=8, seq_len=32, save_every=2, eval_every=100, log_every=1,
                          warmup_steps=1, seed=3, mesh=mesh, zero=zero, learning_rate=1e-2)
        train(RECIPE, lora, cfg, tmp_path / (mesh or "one"), **QUIET)
        runs[mesh] = _params(tmp_path / (mesh or "one"))
    one, sharded = runs[""], runs["data=2,fsdp=2,tensor=2"]
    for path in one:
        np.testing.assert_allclose(sharded[path], one[path], atol=2e-5, rtol=2e-5, err_msg=str(path))
    assert any(np.abs(one[p]).max() > 1e-3 for p in one if p[-1] == "lora_b")  # two steps moved the adapters


def test_lora_memory_on_the_compiled_step():
    """Per-device state and peak of the compiled step: LoRA drops the frozen weights' gradients,
    optimizer state and float32 copies (``benchmarks/esm2_memory.py`` reports it at ESM-2's sizes)."""
    from sciscale_jax.memory import estimate as mem
    from sciscale_jax.memory import report_from_analysis
    from sciscale_jax.train.abstract import abstract_run

    big = dict(num_layers=4, num_heads=4, embed_dim=256, mlp_dim=1024, max_len=64, precision="bf16",
               scan_layers=True, remat="full")
    cfg = TrainConfig(steps=1, batch_size=2, seq_len=64)
    runs = {r: abstract_run(RECIPE, RECIPE.make_config(**big, lora_rank=r), cfg) for r in (0, 8)}
    peak = {r: report_from_analysis(run.compile(analysis_only=True).memory_analysis()).peak_bytes
            for r, run in runs.items()}
    state = {r: mem.state_bytes(run) for r, run in runs.items()}
    n = sum(x.size for x in jax.tree.leaves(runs[0].state.params))  # the base model's parameters
    n_lora = sum(x.size for p, x in traverse_util.flatten_dict(runs[8].state.params).items() if is_lora(p))
    # By hand: the full run keeps fp32 weights, gradients and AdamW's two moments; LoRA keeps bf16
    # frozen weights and the fp32 adapters' own.
    assert state[0] == {"params": 4 * n, "grads": 4 * n, "opt_state": state[0]["opt_state"], "offloaded": 0}
    assert state[0]["opt_state"] >= 8 * n
    assert state[8]["params"] == 2 * n + 4 * n_lora and state[8]["grads"] == 4 * n_lora
    assert state[8]["opt_state"] < 8 * n_lora + 64
    # The compiled step: what the state lost, and no float32 copy of the frozen weights (XLA's CPU
    # dots upcast them; remat.compiler_options keeps that per layer: measured 84.2 and 15.9 MB).
    assert peak[8] < 0.25 * peak[0]
    assert peak[0] - peak[8] > sum(state[0].values()) - sum(state[8].values())


def test_settings_lora_cannot_honour_are_refused(tmp_path):
    @dataclasses.dataclass(frozen=True)
    class NoAdapters(Techniques):  # a model family that builds none
        width: int = 8

    with pytest.raises(ValueError, match="NoAdapters has no LoRA adapters"):
        NoAdapters(lora_rank=4)
    assert get_recipe("msa-evoformer").make_config(lora_rank=4).lora_rank == 4  # beside its attention weights
    assert get_recipe("weather-vit").make_config(lora_rank=4).lora_rank == 4  # adapters on its shared blocks
    assert TransformerConfig(**SHAPE, lora_rank=4).techniques.lora_rank == 4  # the switches alone
    for bad, match in (({"lora_rank": -1}, "lora_rank"), ({"lora_rank": True}, "lora_rank"),
                       ({"lora_rank": 2, "lora_alpha": 0.0}, "lora_alpha"),
                       ({"lora_rank": 2, "lora_targets": "mlp"}, "lora_targets")):
        with pytest.raises(ValueError, match=match):
            TransformerConfig(**SHAPE, **bad)
    lora = RECIPE.make_config(**{**MODEL.to_dict(), "lora_rank": 4, "scan_layers": True})
    with pytest.raises(ValueError, match="lora_rank=4 with pipeline=2"):
        train(RECIPE, lora, TrainConfig(steps=1, batch_size=8, seq_len=32, mesh="pipeline=2", microbatches=2),
              tmp_path / "p", **QUIET)
    assert not (tmp_path / "p").exists()


@pytest.mark.parametrize("model_kw, train_kw", [({}, {"grad_accum": 2}), ({"precision": "fp16"}, {}),
                                                ({"precision": "fp8"}, {}), ({}, {"mesh": "data=4", "zero": 2})])
def test_lora_composes_with_accumulation_loss_scaling_fp8_and_zero2(tmp_path, model_kw, train_kw):
    """The gradient paths other than plain backprop (accumulation, fp16's scaled loss, fp8's scale
    updates, ZeRO-2's reduce-scatter) differentiate the adapters alone too: a step leaves the
    frozen weights as they were."""
    lora = RECIPE.make_config(**{**MODEL.to_dict(), "lora_rank": 4, **model_kw})
    cfg = TrainConfig(steps=2, batch_size=8, seq_len=32, save_every=1, eval_every=100, log_every=1, warmup_steps=1,
                      seed=5, learning_rate=1e-2, **train_kw)
    result = train(RECIPE, lora, cfg, tmp_path / "run", **QUIET)
    first = _flat(load_run(tmp_path / "run", step=1, log=lambda *_: None).model)
    after = traverse_util.flatten_dict(jax.tree.map(np.asarray, result["state"].params))
    assert set(after) == set(first)
    assert all(np.array_equal(after[p], first[p]) for p in first if not is_lora(p))  # the second step froze them
    assert all(not np.array_equal(after[p], first[p]) for p in first if p[-1] == "lora_b")  # and moved these
    assert np.isfinite(result["train_loss"])


@pytest.mark.parametrize("scan_layers", [False, True])
def test_without_lora_folds_each_adapter_into_its_kernel(scan_layers):
    from sciscale_jax.models.stack import without_lora

    model = Transformer(TransformerConfig(**SHAPE, lora_rank=3, lora_alpha=6.0, lora_targets="all",
                                          scan_layers=scan_layers), rngs=nnx.Rngs(0))
    _random_adapters(model, seed=4)
    plain = without_lora(model)
    assert plain.config.lora_rank == 0 and not any(is_lora(p) for p in _flat(plain))
    if not scan_layers:  # the kernels are the numpy merge's
        want = _flat(_merged_model(model))
        got = _flat(plain)
        assert got.keys() == want.keys()
        for path in want:
            np.testing.assert_allclose(got[path], want[path], atol=1e-6, rtol=1e-6, err_msg=str(path))
    tokens = jnp.asarray(np.random.default_rng(1).integers(0, 13, (2, 11)))
    np.testing.assert_allclose(plain(tokens), model(tokens), atol=2e-5, rtol=2e-5)
    with pytest.raises(ValueError, match="no LoRA adapters"):
        without_lora(plain)


@pytest.mark.parametrize("then", [{}, {"lora_rank": 2}])
def test_init_from_a_lora_run_folds_its_adapters_in(pretrained, tmp_path, then):
    """A LoRA run continued in full (or with fresh adapters of another rank): step 1 logs the LoRA
    model's own loss, its adapters folded into the kernels."""
    lora = RECIPE.make_config(**{**MODEL.to_dict(), "lora_rank": 4, "lora_targets": "all"})
    base = dict(batch_size=8, seq_len=32, eval_every=100, log_every=1, warmup_steps=1, learning_rate=1e-2)
    train(RECIPE, lora, TrainConfig(steps=3, save_every=3, seed=7, init_from=str(pretrained), **base),
          tmp_path / "lora", **QUIET)
    after = RECIPE.make_config(**{**MODEL.to_dict(), **then})
    cfg = TrainConfig(steps=1, save_every=1, seed=9, init_from=str(tmp_path / "lora"), **base)
    lines = []
    train(RECIPE, after, cfg, tmp_path / "next", progress=False, log=lines.append)
    assert any("folded into the kernels" in line for line in lines)
    batch = jax.tree.map(np.asarray, RECIPE.build_data(cfg, after).train.batch(0))
    total, count = RECIPE.loss_fn(load_run(tmp_path / "lora", log=lambda *_: None).model, batch, None)
    assert _first_loss(tmp_path / "next") == pytest.approx(float(total) / float(count), rel=1e-5)
    tuned = _params(tmp_path / "next")
    assert any(p[-1] == "lora_a" for p in tuned) == bool(then)
    wider = RECIPE.make_config(**{**MODEL.to_dict(), "embed_dim": 64, "mlp_dim": 128})
    with pytest.raises(ValueError, match=r"has shape .* this run's is"):
        train(RECIPE, wider, cfg, tmp_path / "wider", **QUIET)
    assert not (tmp_path / "wider").exists()


def test_a_qlora_run_from_a_pretrained_run(pretrained, tmp_path):
    qlora = RECIPE.make_config(**{**MODEL.to_dict(), "lora_rank": 4, "lora_quant": "nf4"})
    finals = {}
    for mesh, zero in (("", 0), ("data=2,fsdp=2,tensor=2", 3)):
        cfg = TrainConfig(steps=3, batch_size=8, seq_len=32, save_every=3, eval_every=100, log_every=1,
                          warmup_steps=1, seed=7, init_from=str(pretrained), mesh=mesh, zero=zero, learning_rate=1e-2)
        out = tmp_path / (mesh or "one")
        result = train(RECIPE, qlora, cfg, out, **QUIET)
        finals[mesh] = _flat(load_run(out, log=lambda *_: None).model)
        if mesh:  # ZeRO-3: the 4-bit codes are split over the devices too
            codes = [x for p, x in traverse_util.flatten_dict(result["state"].params).items() if p[-1] == "kernel_nf4"]
            assert codes and all(x.addressable_shards[0].data.size < x.size for x in codes)
    base = load_run(pretrained, log=lambda *_: None).model
    start = _flat(base)
    one = finals[""]
    # Every stored kernel holds the pretrained kernel's nearest levels; every other frozen weight is as read.
    replaced = {}
    for at in sorted(p[:-1] for p in one if p[-1] == "kernel_nf4"):
        w, absmax = start[at + ("kernel",)], one[at + ("kernel_absmax",)]
        want, want_absmax, scaled = ref.quantize(w, w.shape[-1] // absmax.shape[-1])
        assert not np.any((ref.unpack(one[at + ("kernel_nf4",)]) != want) & ~ref.near_a_midpoint(scaled))
        np.testing.assert_array_equal(absmax, want_absmax.astype(np.float32))
        replaced[at + ("kernel",)] = ref.dequantize(want, want_absmax).astype(np.float32)
    assert set(replaced) == {p for p in start if p[0] == "layers" and p[-1] == "kernel"}
    assert all(np.array_equal(one[p], start[p]) for p in one if p in start)
    # Step 1's loss is the pretrained model's on the numpy-dequantised weights (adapters add 0).
    batch = jax.tree.map(np.asarray, RECIPE.build_data(cfg, qlora).train.batch(0))
    total, count = RECIPE.loss_fn(base, batch, None)
    nnx.update(base, nnx.State(traverse_util.unflatten_dict(replaced)))
    q_total, _ = RECIPE.loss_fn(base, batch, None)
    for mesh in finals:
        assert _first_loss(tmp_path / (mesh or "one")) == pytest.approx(float(q_total) / float(count), rel=1e-5)
    assert float(q_total) != float(total)  # (4 bits do change the model)
    # The adapters trained; the mesh run equals the single-device one.
    assert all(np.abs(one[p]).max() > 0 for p in one if p[-1] == "lora_b")
    for path in one:
        np.testing.assert_allclose(finals["data=2,fsdp=2,tensor=2"][path], one[path], atol=2e-5, rtol=2e-5,
                                   err_msg=str(path))


def test_lora_train_trains_the_named_parameters_beside_the_adapters(pretrained, tmp_path):
    """PEFT's modules_to_save: the parameters ``lora_train`` names train (from the pretrained values,
    in param_dtype, with optimizer state) and every other frozen weight stays as read. One AdamW
    step from zero adapters moves each named weight by -lr * sign of the pretrained model's own
    gradient (Adam's first step), the reference taken with jax.grad of the plain model."""
    lora = RECIPE.make_config(**{**MODEL.to_dict(), "lora_rank": 4, "lora_train": "lm_head, final_norm"})
    cfg = TrainConfig(steps=1, batch_size=8, seq_len=32, save_every=1, eval_every=100, log_every=1, warmup_steps=0,
                      weight_decay=0.0, grad_clip=0.0, seed=7, init_from=str(pretrained), learning_rate=1e-3)
    result = train(RECIPE, lora, cfg, tmp_path / "tuned", **QUIET)
    before, after = _params(pretrained), _params(tmp_path / "tuned")
    named = [p for p in before if p[0] in ("lm_head", "final_norm")]
    assert len(named) == 2 and all(not is_lora(p) for p in named)
    assert all(np.array_equal(before[p], after[p]) for p in before if p not in named)
    base = load_run(pretrained, log=lambda *_: None).model
    batch = jax.tree.map(np.asarray, RECIPE.build_data(cfg, lora).train.batch(0))
    graphdef, params, rest = nnx.split(base, nnx.Param, ...)

    def loss(p):
        total, count = RECIPE.loss_fn(nnx.merge(graphdef, p, rest), batch, None)
        return total / count

    grads = traverse_util.flatten_dict(nnx.to_pure_dict(jax.grad(loss)(params)))
    for path in named:
        g, step = np.asarray(grads[path]), after[path] - before[path]
        sure = np.abs(g) > 1e-4 * np.abs(g).max()  # (Adam's eps blurs the sign of the tiniest gradients)
        assert sure.mean() > 0.9
        np.testing.assert_array_equal(np.sign(step[sure]), -np.sign(g[sure]), err_msg=str(path))
        np.testing.assert_allclose(np.abs(step[sure]), 1e-3, rtol=2e-3, err_msg=str(path))
    # Optimizer state for the adapters and the named parameters; those written in adapters-only checkpoints.
    n_trained = sum(after[p].size for p in after if is_lora(p) or p in named)
    opt_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(result["state"].opt_state) if x.ndim > 0)
    assert opt_bytes == 2 * 4 * n_trained
    from sciscale_jax.train.checkpoint import _saved_signature

    saved = {n.split("/", 1)[1] for n in _saved_signature(tmp_path / "tuned" / "checkpoints" / "1")
             if n.startswith("params/")}
    assert saved == {"/".join(map(str, p)) for p in after if is_lora(p) or p in named}


def test_lora_train_keeps_the_named_parameters_in_param_dtype_and_refuses_what_cannot_train(tmp_path):
    cfg = TransformerConfig(**SHAPE, lora_rank=2, precision="bf16", lora_train="lm_head")
    dtypes = {p: v.dtype for p, v in _flat(Transformer(cfg, rngs=nnx.Rngs(0))).items()}
    assert all(d == (np.float32 if is_lora(p) or p[0] == "lm_head" else jnp.bfloat16) for p, d in dtypes.items())
    for bad, match in (({"lora_train": "lm_head"}, "needs lora_rank > 0"),
                       ({"lora_rank": 2, "lora_train": "lm-head"}, "must name parameters")):
        with pytest.raises(ValueError, match=match):
            TransformerConfig(**SHAPE, **bad)
    run = dict(steps=1, batch_size=8, seq_len=32)
    for extra, match in (({"lora_train": "lm_head,nope"}, r"no parameter or module named 'nope' \(the model's "
                                                          r"modules: .*lm_head"),
                         ({"lora_train": "wo", "lora_targets": "all", "lora_quant": "nf4"},
                          r"names layers/0/mlp/wo, stored in 4 bits")):
        lora = RECIPE.make_config(**{**MODEL.to_dict(), "lora_rank": 4, **extra})
        with pytest.raises(ValueError, match=match):
            train(RECIPE, lora, TrainConfig(**run), tmp_path / "x", **QUIET)
        assert not (tmp_path / "x").exists()
