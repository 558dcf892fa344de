"""weather-vit: the latitude-weighted metrics against plainly written formulas, the dinosaur
trajectory cache (deterministic, corrupt or partial entries rebuilt, a clear error without
dinosaur), the ClimaX model (patching, variable aggregation, finite-difference gradients), and
the recipe trained through the CLI and the train loop under the shared technique flags, LoRA on
the ViT's blocks (against numpy-merged weights) and multi-step rollout training (against the
model applied to its own forecasts, finite differences and the compiled step's memory)."""

import dataclasses
import json
import math
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sciscale_jax import cli
from sciscale_jax.data import weather as wx
from sciscale_jax.models.climax import ClimaX, ClimaXConfig, VariableAggregation, patchify, unpatchify
from sciscale_jax.recipes import weather_vit
from sciscale_jax.train import TrainConfig, train

dinosaur = pytest.importorskip("dinosaur", reason='weather data needs dinosaur: pip install -e ".[weather]"')

# A tiny simulation: 4 sigma levels, half a day of spin-up, one day recorded, an 8 x 24 grid.
TINY_DATA = dict(layers=4, lat=8, lon=24, spinup_days=0.5, days=1.0, train_trajectories=2, val_trajectories=1)
TINY_FLAGS = ["--sim-layers", "4", "--lat", "8", "--lon", "24", "--spinup-days", "0.5", "--trajectory-days", "1",
              "--train-trajectories", "2", "--val-trajectories", "1", "--patch-size", "4", "--layers", "2",
              "--heads", "2", "--embed-dim", "16", "--mlp-dim", "32", "--batch-size", "8", "--warmup-steps", "1",
              "--no-progress"]


def _plain_lat_weights(n):
    lats = [-90.0 + (i + 0.5) * 180.0 / n for i in range(n)]
    c = [math.cos(math.radians(x)) for x in lats]
    return [v / (sum(c) / n) for v in c]


# --- metrics --------------------------------------------------------------------------------------------------

def _plain_mse_per_var(pred, truth):
    """sum over samples, lat, lon of w(lat) err^2 / count, per variable, by loops."""
    b, v, h, w = pred.shape
    wl = _plain_lat_weights(h)
    out = []
    for k in range(v):
        total = 0.0
        for i in range(b):
            for y in range(h):
                for x in range(w):
                    total += wl[y] * (float(pred[i, k, y, x]) - float(truth[i, k, y, x])) ** 2
        out.append(total / (b * h * w))
    return np.array(out)


@pytest.mark.parametrize("x64", [False, True])
def test_lat_weighted_mse_matches_a_plain_formula(x64):
    rng = np.random.default_rng(0)
    pred, truth = rng.normal(size=(3, 2, 7, 5)), rng.normal(size=(3, 2, 7, 5))
    expected = _plain_mse_per_var(pred, truth)
    lat = -90.0 + (np.arange(7) + 0.5) * 180.0 / 7
    np.testing.assert_allclose(wx.lat_weighted_mse(pred, truth, lat), expected, rtol=1e-12)
    with jax.enable_x64(x64):
        s, n = weather_vit.lat_weighted_mse(jnp.asarray(pred, jnp.float32), jnp.asarray(truth, jnp.float32))
        assert float(s) / float(n) == pytest.approx(expected.mean(), rel=1e-5)
        valid = jnp.array([1.0, 0.0, 1.0])  # padding rows count for nothing
        s, n = weather_vit.lat_weighted_mse(jnp.asarray(pred, jnp.float32), jnp.asarray(truth, jnp.float32), valid)
        kept = _plain_mse_per_var(pred[[0, 2]], truth[[0, 2]]).mean()
        assert float(n) == 2 * 2 * 7 * 5 and float(s) / float(n) == pytest.approx(kept, rel=1e-5)


def test_channel_metrics_match_weatherbench_formulas():
    rng = np.random.default_rng(1)
    b, v, h, w = 4, 3, 6, 5
    pred, truth, clim = (rng.normal(size=(b, v, h, w)) for _ in range(3))
    scale = rng.uniform(0.5, 3.0, size=v)
    valid = np.array([1.0, 1.0, 1.0, 0.0])
    got = jax.device_get(weather_vit.channel_metrics(
        jnp.asarray(pred, jnp.float32), jnp.asarray(truth, jnp.float32), jnp.asarray(clim, jnp.float32),
        jnp.asarray(np.broadcast_to(scale, (b, v)), jnp.float32), jnp.asarray(valid, jnp.float32), ("a", "b", "c")))
    wl = np.array(_plain_lat_weights(h))[:, None]
    for k, name in enumerate("abc"):
        mse = np.mean([np.mean(wl * (pred[i, k] - truth[i, k]) ** 2) for i in range(3)]) * scale[k] ** 2
        s, n = got[f"mse_{name}"]
        assert float(s) / float(n) == pytest.approx(mse, rel=1e-5)
        accs = []
        for i in range(3):  # ACC of one state: weighted correlation of anomalies (no mean removal)
            fa, ta = pred[i, k] - clim[i, k], truth[i, k] - clim[i, k]
            accs.append(np.sum(wl * fa * ta) / np.sqrt(np.sum(wl * fa ** 2) * np.sum(wl * ta ** 2)))
        s, n = got[f"acc_{name}"]
        assert float(s) / float(n) == pytest.approx(np.mean(accs), rel=1e-5)
        lat = -90.0 + (np.arange(h) + 0.5) * 180.0 / h
        assert wx.lat_weighted_acc(pred[:3], truth[:3], clim[0], lat)[k] == pytest.approx(
            np.mean([np.sum(wl * (pred[i, k] - clim[0, k]) * (truth[i, k] - clim[0, k])) / np.sqrt(
                np.sum(wl * (pred[i, k] - clim[0, k]) ** 2) * np.sum(wl * (truth[i, k] - clim[0, k]) ** 2))
                for i in range(3)]), rel=1e-10)


def test_forecast_batches_pair_states_at_the_lead():
    rng = np.random.default_rng(2)
    traj = rng.normal(size=(2, 7, 3, 4, 6)).astype(np.float32)
    fb = wx.ForecastBatches(traj, lead_steps=2, interval_hours=6, batch_size=4, seed=5)
    a, b = fb.batch(3), wx.ForecastBatches(traj, lead_steps=2, interval_hours=6, batch_size=4, seed=5).batch(3)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])
    for x, y in zip(a["x"], a["y"]):  # every pair is (state t, state t + 2) of one trajectory
        hits = [(i, t) for i in range(2) for t in range(5) if np.array_equal(traj[i, t], x)]
        assert len(hits) == 1 and np.array_equal(traj[hits[0][0], hits[0][1] + 2], y)
    assert (a["lead"] == 12.0).all()
    evals = fb.eval_batches({"clim": np.ones((3, 4, 6), np.float32)})
    assert sum(e["valid"].sum() for e in evals) == 2 * 5 and evals[-1]["clim"].shape == (4, 3, 4, 6)
    with pytest.raises(ValueError, match="lead_steps=7"):
        wx.ForecastBatches(traj, lead_steps=7, interval_hours=6, batch_size=4)


# --- the cache ------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_cache(tmp_path_factory):
    """A cache root holding the tiny configuration, simulated once for the module."""
    root = tmp_path_factory.mktemp("weather-cache")
    wx.load_weather(wx.WeatherDataConfig(**TINY_DATA), root, log=lambda *_: None)
    return root


def test_cache_is_deterministic_and_physical(tiny_cache, tmp_path, monkeypatch):
    cfg = wx.WeatherDataConfig(**TINY_DATA)
    first = wx.load_weather(cfg, tiny_cache, log=lambda *_: None)
    assert first.fields.shape == (3, 5, len(wx.VARIABLES), 8, 24) and first.fields.dtype == np.float32
    assert first.variables == ("z375", "t375", "t875", "u125", "u875", "v125", "v875", "ps")
    again = wx.load_weather(cfg, tmp_path, log=lambda *_: None)  # simulated again into another root
    np.testing.assert_array_equal(first.fields, again.fields)
    manifests = [json.loads((wx.cache_path(cfg, r) / "manifest.json").read_text()) for r in (tiny_cache, tmp_path)]
    assert manifests[0]["sha256"] == manifests[1]["sha256"]
    monkeypatch.setattr(wx, "simulate", lambda *a, **k: pytest.fail("an intact cache was simulated again"))
    np.testing.assert_array_equal(wx.load_weather(cfg, tiny_cache).fields, first.fields)
    f = first.fields
    assert np.isfinite(f).all()
    ps, t = f[:, :, first.variables.index("ps")], f[:, :, first.variables.index("t875")]
    assert 950 < ps.mean() < 1050 and 200 < t.min() and t.max() < 330  # hPa, K
    np.testing.assert_allclose(first.lat, -90 + (np.arange(8) + 0.5) * 180 / 8)
    assert not np.array_equal(f[0], f[1])  # trajectories differ by their seeds


@pytest.mark.parametrize("damage", ["flip_byte", "truncate", "no_manifest", "bad_manifest", "other_config"])
def test_corrupt_or_partial_cache_is_rebuilt(tiny_cache, tmp_path, damage):
    cfg = wx.WeatherDataConfig(**TINY_DATA)
    good = wx.load_weather(cfg, tiny_cache, log=lambda *_: None).fields
    shutil.copytree(tiny_cache, tmp_path, dirs_exist_ok=True)
    entry = wx.cache_path(cfg, tmp_path)
    array, manifest = entry / "fields.npy", entry / "manifest.json"
    if damage == "flip_byte":
        raw = bytearray(array.read_bytes())
        raw[-7] ^= 0x10
        array.write_bytes(bytes(raw))
    elif damage == "truncate":
        array.write_bytes(array.read_bytes()[:1000])
    elif damage == "no_manifest":
        manifest.unlink()
    elif damage == "bad_manifest":
        manifest.write_text(manifest.read_text()[:50])
    else:
        m = json.loads(manifest.read_text())
        m["config"]["seed"] = 99
        manifest.write_text(json.dumps(m))
    assert wx.check_cache(entry, cfg) is not None
    lines = []
    rebuilt = wx.load_weather(cfg, tmp_path, log=lines.append)
    assert any("rebuilding" in line for line in lines), lines
    np.testing.assert_array_equal(rebuilt.fields, good)
    assert wx.check_cache(entry, cfg) is None


def test_missing_dinosaur_names_the_extra(tmp_path, monkeypatch, capsys, tiny_cache):
    find_spec = wx.importlib.util.find_spec
    monkeypatch.setattr(wx.importlib.util, "find_spec",
                        lambda name, *a: None if name == "dinosaur" else find_spec(name, *a))
    wx._model.cache_clear()
    with pytest.raises(ImportError, match=r'pip install -e "\.\[weather\]"'):
        wx.simulate(wx.WeatherDataConfig(**{**TINY_DATA, "seed": 7}))
    assert wx.load_weather(wx.WeatherDataConfig(**TINY_DATA), tiny_cache).fields.size  # a cache needs no dinosaur
    assert cli.main(["train", "weather-vit", "--steps", "1", "--out", str(tmp_path / "run"),
                     "--cache-dir", str(tmp_path / "empty"), *TINY_FLAGS]) == 2
    assert not (tmp_path / "run").exists()
    assert capsys.readouterr().err.strip() == ('sciscale: error: weather data needs dinosaur: '
                                               'pip install -e ".[weather]"')


def test_bad_data_settings_are_refused():
    with pytest.raises(ValueError, match="dt_minutes=50"):
        wx.WeatherDataConfig(dt_minutes=50)
    with pytest.raises(ValueError, match="lon=16 must be at least truncation"):
        wx.WeatherDataConfig(lon=16)
    with pytest.raises(ValueError, match="truncation=20"):
        wx.WeatherDataConfig(truncation=20)
    with pytest.raises(ValueError, match="patch_size=5 must divide lat=32"):
        ClimaXConfig(patch_size=5)
    with pytest.raises(ValueError, match="num_vars=3 must equal"):
        weather_vit.WeatherViTConfig(num_vars=3)
    with pytest.raises(ValueError, match="not divisible by num_heads"):
        ClimaXConfig(embed_dim=30, num_heads=4)


# --- the model ------------------------------------------------------------------------------------------------

SMALL = dict(num_vars=3, lat=6, lon=10, patch_size=2, num_layers=2, num_heads=2, embed_dim=12, mlp_dim=20)


def test_patchify_cuts_row_major_patches_and_unpatchify_inverts_it():
    x = np.random.default_rng(3).normal(size=(2, 3, 6, 10)).astype(np.float32)
    p = np.asarray(patchify(jnp.asarray(x), 2))
    assert p.shape == (2, 3, 15, 4)
    for i in range(3):
        for j in range(5):
            np.testing.assert_array_equal(p[:, :, i * 5 + j], x[:, :, 2 * i:2 * i + 2, 2 * j:2 * j + 2].reshape(2, 3, 4))
    np.testing.assert_array_equal(np.asarray(unpatchify(jnp.asarray(p).transpose(0, 2, 1, 3), 6, 10, 2)), x)


def test_variable_aggregation_is_softmax_attention_of_one_query():
    cfg = ClimaXConfig(**SMALL)
    agg = VariableAggregation(cfg, rngs=nnx.Rngs(4))
    t = np.random.default_rng(5).normal(size=(2, 3, 4, 12))  # [B, L, V, E]
    got = np.asarray(agg(jnp.asarray(t, jnp.float32)))
    w = {k: np.asarray(getattr(agg, k).kernel[...], np.float64) for k in ("query", "key", "value", "out")}
    q = np.einsum("e,ehd->hd", np.asarray(agg.query_token[...], np.float64), w["query"])
    for b in range(2):
        for l in range(3):
            k = np.einsum("ve,ehd->vhd", t[b, l], w["key"])
            v = np.einsum("ve,ehd->vhd", t[b, l], w["value"])
            logits = np.einsum("hd,vhd->hv", q, k) / math.sqrt(6)
            probs = np.exp(logits - logits.max(1, keepdims=True))
            probs /= probs.sum(1, keepdims=True)
            ctx = np.einsum("hv,vhd->hd", probs, v)
            np.testing.assert_allclose(got[b, l], np.einsum("hd,hde->e", ctx, w["out"]), rtol=1e-4, atol=1e-5)


def test_untrained_residual_model_is_persistence_and_shapes():
    model = ClimaX(ClimaXConfig(**SMALL), rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(1), (2, 3, 6, 10), jnp.float32)  # float32 with x64 on too
    y = model(x, jnp.array([6.0, 24.0]))
    assert y.shape == x.shape and y.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(y), np.asarray(x))
    with pytest.raises(ValueError, match="do not match"):
        model(jnp.zeros((2, 3, 6, 12)), jnp.array([6.0, 6.0]))


def test_forward_is_the_same_with_x64_on_and_off():
    model = ClimaX(ClimaXConfig(**SMALL, residual=False), rngs=nnx.Rngs(6))
    x = np.random.default_rng(7).normal(size=(2, 3, 6, 10)).astype(np.float32)
    lead = np.array([6.0, 12.0], np.float32)
    off = np.asarray(model(jnp.asarray(x), jnp.asarray(lead)))
    with jax.enable_x64(True):
        on = model(jnp.asarray(x), jnp.asarray(lead))
        assert on.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(on), off, rtol=1e-5, atol=1e-6)


def test_gradients_match_finite_differences():
    # float32: the shared blocks normalise and rotate in float32, so a float64 model would not be
    # float64 throughout; a unit direction, a central difference and a 2% tolerance check the gradient
    cfg = ClimaXConfig(**SMALL, residual=False)
    model = ClimaX(cfg, rngs=nnx.Rngs(2))
    x = jax.random.normal(jax.random.key(3), (2, 3, 6, 10))
    y = jax.random.normal(jax.random.key(4), (2, 3, 6, 10))
    lead = jnp.array([6.0, 18.0])
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    @jax.jit
    def loss(p):
        s, n = weather_vit.lat_weighted_mse(nnx.merge(graphdef, p, rest)(x, lead), y)
        return s / n

    grads = jax.jit(jax.grad(loss))(params)
    direction = jax.tree.map(lambda g: jax.random.normal(jax.random.key(g.size), g.shape), grads)
    norm = math.sqrt(sum(float(jnp.vdot(d, d)) for d in jax.tree.leaves(direction)))
    direction = jax.tree.map(lambda d: d / norm, direction)
    eps = 1e-2
    plus = loss(jax.tree.map(lambda p, d: p + eps * d, params, direction))
    minus = loss(jax.tree.map(lambda p, d: p - eps * d, params, direction))
    analytic = sum(float(jnp.vdot(g, d)) for g, d in zip(jax.tree.leaves(grads), jax.tree.leaves(direction)))
    assert analytic == pytest.approx(float(plus - minus) / (2 * eps), rel=2e-2)
    for name in ("patch_kernel", "pos_embed", "var_embed"):  # every stage of the model gets a gradient
        assert float(jnp.abs(grads[name][...]).max()) > 0
    assert float(jnp.abs(grads["aggregate"]["query"]["kernel"][...]).max()) > 0
    assert float(jnp.abs(grads["lead_embed"]["kernel"][...]).max()) > 0


# --- the recipe through the CLI and the train loop ------------------------------------------------------------

def _train(cache, tmp_path, name, steps=3, resume=False, model=(), **over):
    recipe, model_cfg, train_cfg = cli.build_configs(["weather-vit", *TINY_FLAGS, "--cache-dir", str(cache), *model])
    cfg = TrainConfig(**{**train_cfg.to_dict(), "steps": steps, "eval_every": 1000, "save_every": 2,
                         "log_every": 1, **over})
    return train(recipe, model_cfg, cfg, tmp_path / name, resume=resume, progress=False, log=lambda *_: None)


def _leaves(state):
    return [np.asarray(x) for x in jax.tree.leaves(jax.device_get(state.params))]


def test_cli_trains_in_bf16_and_reports_baselines(tiny_cache, tmp_path, capsys):
    assert cli.main(["train", "weather-vit", "--out", str(tmp_path / "run"), "--steps", "3", "--eval-every", "2",
                     "--precision", "bf16", "--cache-dir", str(tiny_cache), *TINY_FLAGS]) == 0
    out = capsys.readouterr().out
    for name in ("persistence_loss", "climatology_loss", "persistence_rmse_t875", "climatology_rmse_ps",
                 "persistence_acc_z375"):
        assert f"baseline {name}: " in out
    assert "rmse_u125" in out and "acc_v875" in out and "train step memory per device" in out
    assert math.isfinite(float(out.split("final train loss ")[1].split()[0]))


def test_techniques_on_eight_devices_match_the_plain_run(tiny_cache, tmp_path):
    plain = _train(tiny_cache, tmp_path, "plain")
    other = _train(tiny_cache, tmp_path, "other", model=["--remat", "full", "--attention", "chunked"],
                   mesh="data=2,fsdp=2,tensor=2", zero=3, grad_accum=2)
    for a, b in zip(_leaves(plain["state"]), _leaves(other["state"])):
        np.testing.assert_allclose(a, b, rtol=2e-4, atol=1e-5)
    assert other["val_loss"] == pytest.approx(plain["val_loss"], rel=1e-4)
    assert other["val_rmse_ps"] == pytest.approx(plain["val_rmse_ps"], rel=1e-4)


def test_recipe_resumes_bit_identically(tiny_cache, tmp_path):
    full = _train(tiny_cache, tmp_path, "full", steps=4, model=["--remat", "full"])
    shutil.copytree(tmp_path / "full", tmp_path / "split")  # the same run, as if killed after its step-2 checkpoint
    shutil.rmtree(tmp_path / "split" / "checkpoints" / "4")
    resumed = _train(tiny_cache, tmp_path, "split", steps=4, resume=True, model=["--remat", "full"])
    for a, b in zip(_leaves(full["state"]), _leaves(resumed["state"])):
        np.testing.assert_array_equal(a, b)
    assert resumed["val_loss"] == full["val_loss"]


@pytest.mark.slow
def test_flash_attention_trains(tiny_cache, tmp_path):
    plain = _train(tiny_cache, tmp_path, "plain", steps=2)
    flash = _train(tiny_cache, tmp_path, "flash", steps=2, model=["--attention", "flash"])
    for a, b in zip(_leaves(plain["state"]), _leaves(flash["state"])):
        np.testing.assert_allclose(a, b, rtol=2e-4, atol=1e-5)


def test_rollout_scores_every_lead(tiny_cache):
    recipe, model_cfg, _ = cli.build_configs(["weather-vit", *TINY_FLAGS, "--cache-dir", str(tiny_cache)])
    prep = weather_vit.prepare(model_cfg, log=lambda *_: None)
    model = ClimaX(model_cfg, rngs=nnx.Rngs(0))  # untrained: residual head at zero, i.e. persistence
    out = weather_vit.rollout(model, prep, lead_steps=1, max_steps=3, every=1, batch_size=4)
    assert out["lead_hours"] == [6, 12, 18] and out["starts"] == 1 * (5 - 3)
    for ch in prep.weather.variables:
        np.testing.assert_allclose(out["model"][ch], out["persistence"][ch], rtol=1e-5)
    # persistence at lead k, written plainly on the held-out trajectory in physical units
    val, lat = prep.weather.val[0], prep.weather.lat
    k = prep.weather.variables.index("t875")
    for step in (1, 3):
        se = [wx.lat_weighted_mse(val[j][None], val[j + step][None], lat)[k] for j in range(2)]
        assert out["persistence"]["t875"][step - 1] == pytest.approx(math.sqrt(np.mean(se)), rel=1e-5)


@pytest.mark.slow
def test_example_script_reports_baselines_and_plots(tiny_cache, tmp_path, capsys):
    import importlib.util
    import pathlib

    pytest.importorskip("matplotlib")
    path = pathlib.Path(__file__).parents[1] / "examples" / "weather_vit.py"
    spec = importlib.util.spec_from_file_location("weather_vit_example", path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    assert example.main([*TINY_FLAGS, "--cache-dir", str(tiny_cache), "--steps", "4", "--rollout-steps", "3",
                         "--rollout-every", "1", "--out", str(tmp_path / "run"), "--plot", str(tmp_path / "r.png"),
                         "--json", str(tmp_path / "figures.json")]) == 0
    out = capsys.readouterr().out
    assert "| channel | model | persistence | climatology |" in out and "train step memory per device" in out
    assert (tmp_path / "r.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    figures = json.loads((tmp_path / "figures.json").read_text())
    assert figures["rollout"]["lead_hours"] == [6, 12, 18] and len(figures["rollout"]["model"]["ps"]) == 3


# --- LoRA fine-tuning (Aurora's: adapters on the backbone, the rest frozen) ------------------------------------

def _params(model) -> dict:
    from flax import traverse_util

    flat = traverse_util.flatten_dict(nnx.to_pure_dict(nnx.state(model, nnx.Param)))
    return {k: np.asarray(v) for k, v in flat.items()}


def _merged_climax(model) -> ClimaX:
    """A ClimaX without adapters whose block kernels are the LoRA model's W + scale * A B, in numpy."""
    from flax import traverse_util

    plain = ClimaX(dataclasses.replace(model.config, lora_rank=0), rngs=nnx.Rngs(9))
    weights, merged = _params(model), {}
    for path, value in weights.items():
        if path[-1] in ("lora_a", "lora_b"):
            continue
        if path[-1] == "kernel" and path[:-1] + ("lora_a",) in weights:
            a, b = weights[path[:-1] + ("lora_a",)], weights[path[:-1] + ("lora_b",)]
            r = a.shape[-1]
            delta = a.reshape(-1, r).astype(np.float64) @ b.reshape(r, -1).astype(np.float64)
            value = (value + model.config.lora_scale * delta.reshape(value.shape)).astype(np.float32)
        merged[path] = value
    nnx.update(plain, nnx.State(traverse_util.unflatten_dict(merged)))
    return plain


@pytest.mark.parametrize("targets", ["attention", "all"])
def test_lora_vit_equals_the_merged_weights(targets):
    cfg = ClimaXConfig(**SMALL, residual=False, lora_rank=3, lora_alpha=6.0, lora_targets=targets)
    model = ClimaX(cfg, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(1), (2, 3, 6, 10))
    lead = jnp.array([6.0, 24.0])
    fresh = model(x, lead)
    # B = 0: the base model (to float32 rounding: XLA may fuse the adapter's zero add into the dot)
    np.testing.assert_allclose(np.asarray(fresh), np.asarray(_merged_climax(model)(x, lead)), rtol=2e-5, atol=2e-5)
    rng = np.random.default_rng(2)
    for path, variable in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        if path[-1] == "lora_b":
            variable.set_value(jnp.asarray(rng.normal(0, 0.3, variable.get_value().shape), jnp.float32))
    out = model(x, lead)
    np.testing.assert_allclose(np.asarray(out), np.asarray(_merged_climax(model)(x, lead)), rtol=2e-5, atol=2e-5)
    assert float(jnp.max(jnp.abs(out - fresh))) > 0.05  # the adapters do change the forecast
    adapted = {p[:-1] for p in _params(model) if p[-1] == "lora_a"}
    mlp = {"wi", "wo"} | ({"wg"} if cfg.mlp != "gelu" else set())
    assert {p[0] for p in adapted} == {"layers"}  # the backbone's blocks alone, not aggregation or the head
    assert {p[-1] for p in adapted} == {"query", "key", "value", "out"} | (mlp if targets == "all" else set())
    bf16 = ClimaX(ClimaXConfig(**SMALL, lora_rank=2, precision="bf16"), rngs=nnx.Rngs(0))
    assert all(v.dtype == (np.float32 if p[-1] in ("lora_a", "lora_b") else jnp.bfloat16)
               for p, v in _params(bf16).items())  # frozen: the compute dtype, no float32 master copy


def test_lora_run_adapts_a_pretrained_forecaster_to_a_longer_lead(tiny_cache, tmp_path):
    from sciscale_jax.recipes import load_run

    _train(tiny_cache, tmp_path, "pretrained", steps=3)
    args = ["weather-vit", *TINY_FLAGS, "--cache-dir", str(tiny_cache), "--lora-rank", "4", "--lead-steps", "2"]
    recipe, model_cfg, train_cfg = cli.build_configs(args)
    cfg = TrainConfig(**{**train_cfg.to_dict(), "steps": 2, "eval_every": 1000, "save_every": 2, "log_every": 1,
                         "learning_rate": 1e-2})
    with pytest.raises(ValueError, match="without --init-from: LoRA freezes the head"):
        train(recipe, model_cfg, cfg, tmp_path / "scratch", progress=False, log=lambda *_: None)
    assert not (tmp_path / "scratch").exists()
    cfg = TrainConfig(**{**cfg.to_dict(), "init_from": str(tmp_path / "pretrained")})
    train(recipe, model_cfg, cfg, tmp_path / "tuned", progress=False, log=lambda *_: None)
    pretrained = load_run(tmp_path / "pretrained", log=lambda *_: None).model
    # the first step's loss: the pretrained forecaster on this run's first batch at the new lead
    batch = jax.tree.map(np.asarray, recipe.build_data(cfg, model_cfg).train.batch(0))
    assert set(batch["lead"].tolist()) == {12.0}
    total, count = recipe.loss_fn(pretrained, batch, None)
    first = next(json.loads(line)["loss"] for line in (tmp_path / "tuned" / "metrics.jsonl").read_text().splitlines()
                 if json.loads(line).get("step") == 1 and "loss" in json.loads(line))
    assert first == pytest.approx(float(total) / float(count), rel=1e-5)
    tuned, start = _params(load_run(tmp_path / "tuned", log=lambda *_: None).model), _params(pretrained)
    assert {p for p in tuned if p[-1] not in ("lora_a", "lora_b")} == set(start)
    assert all(np.array_equal(tuned[p], start[p]) for p in start)  # every pretrained weight as it was
    assert all(np.abs(tuned[p]).max() > 0 for p in tuned if p[-1] == "lora_b")
    # --lora-train lead_embed: the lead-time embedding (a lead it never saw) trains beside the adapters
    lead_cfg = dataclasses.replace(model_cfg, lora_train="lead_embed")
    train(recipe, lead_cfg, cfg, tmp_path / "lead", progress=False, log=lambda *_: None)
    tuned = _params(load_run(tmp_path / "lead", log=lambda *_: None).model)
    moved = {p for p in start if not np.array_equal(tuned[p], start[p])}
    assert moved == {p for p in start if p[0] == "lead_embed"} and moved


# --- multi-step (rollout) fine-tuning -----------------------------------------------------------------------

def test_rollout_batches_carry_the_states_each_step_later():
    traj = np.arange(2 * 9, dtype=np.float32).reshape(2, 9, 1, 1, 1) * np.ones((1, 1, 2, 3, 4), np.float32)
    batches = wx.ForecastBatches(traj, lead_steps=2, interval_hours=6, batch_size=16, rollout_steps=3)
    b = batches.batch(5)
    assert b["y_rollout"].shape == (16, 2, 2, 3, 4)
    start = b["x"][:, 0, 0, 0]  # the state's number: trajectory * 9 + time
    assert np.all(start % 9 + 3 * 2 < 9)  # room for three steps of two intervals
    np.testing.assert_array_equal(b["y"][:, 0, 0, 0], start + 2)
    np.testing.assert_array_equal(b["y_rollout"][:, :, 0, 0, 0], start[:, None] + np.array([4, 6]))
    assert np.all(b["lead"] == 12.0)
    with pytest.raises(ValueError, match="rollout_steps=5: 10 intervals"):
        wx.ForecastBatches(traj, lead_steps=2, interval_hours=6, batch_size=4, rollout_steps=5)
    with pytest.raises(ValueError, match="takes one lead"):
        wx.ForecastBatches(traj, lead_steps=1, max_lead_steps=2, interval_hours=6, batch_size=4, rollout_steps=2)
    with pytest.raises(ValueError, match="rolls out one lead"):
        weather_vit.WeatherViTConfig(lead_steps=1, max_lead_steps=2, train_rollout=2)


def _rollout_setup(grad):
    cfg = ClimaXConfig(**SMALL, residual=False)
    model = ClimaX(cfg, rngs=nnx.Rngs(5))
    import types

    # the recipe's config adds train_rollout_grad to the model's
    model.config = types.SimpleNamespace(**{f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)},
                                         train_rollout_grad=grad)
    rng = np.random.default_rng(6)
    x = rng.normal(size=(2, 3, 6, 10)).astype(np.float32)
    ys = rng.normal(size=(3, 2, 3, 6, 10)).astype(np.float32)
    batch = {"x": jnp.asarray(x), "y": jnp.asarray(ys[0]), "y_rollout": jnp.asarray(ys[1:].transpose(1, 0, 2, 3, 4)),
             "lead": jnp.array([6.0, 6.0])}
    return model, x, ys, batch


def test_rollout_loss_is_the_mean_over_the_models_own_forecasts():
    model, x, ys, batch = _rollout_setup("all")
    lat = -90.0 + (np.arange(6) + 0.5) * 180.0 / 6
    state, want = jnp.asarray(x), []
    for k in range(3):  # the model applied to its own forecast, scored plainly in float64 at each step
        state = model(state, jnp.array([6.0, 6.0]))
        want.append(wx.lat_weighted_mse(np.asarray(state), ys[k], lat).mean())
    total, count = weather_vit.loss_fn(model, batch, None)
    assert float(total) / float(count) == pytest.approx(np.mean(want), rel=1e-5)
    model.config.train_rollout_grad = "last"
    total, count = weather_vit.loss_fn(model, batch, None)
    assert float(total) / float(count) == pytest.approx(want[-1], rel=1e-5)


def test_train_rollout_gradients_all_steps_and_the_pushforward_trick():
    model, x, ys, batch = _rollout_setup("all")
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def loss(p, b):
        s, n = weather_vit.loss_fn(nnx.merge(graphdef, p, rest), b, None)
        return s / n

    grads = jax.grad(loss)(params, batch)  # through every step: a central difference along a unit direction
    direction = jax.tree.map(lambda g: jax.random.normal(jax.random.key(g.size), g.shape), grads)
    norm = math.sqrt(sum(float(jnp.vdot(d, d)) for d in jax.tree.leaves(direction)))
    direction = jax.tree.map(lambda d: d / norm, direction)
    eps = 1e-2
    fd = (loss(jax.tree.map(lambda p, d: p + eps * d, params, direction), batch)
          - loss(jax.tree.map(lambda p, d: p - eps * d, params, direction), batch)) / (2 * eps)
    analytic = sum(float(jnp.vdot(g, d)) for g, d in zip(jax.tree.leaves(grads), jax.tree.leaves(direction)))
    assert analytic == pytest.approx(float(fd), rel=2e-2)
    # pushforward: the gradient of the last step's loss with its input held fixed at the rolled-out state
    model.config.train_rollout_grad = "last"
    last = jax.grad(loss)(params, batch)
    state = model(model(jnp.asarray(x), batch["lead"]), batch["lead"])
    fixed = {"x": state, "y": batch["y_rollout"][:, 1], "lead": batch["lead"]}
    want = jax.grad(loss)(params, fixed)
    for a, b in zip(jax.tree.leaves(last), jax.tree.leaves(want)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)
    differs = max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(jax.tree.leaves(last), jax.tree.leaves(grads)))
    assert differs > 1e-3  # not the all-steps gradient
    # each step checkpointed (recomputed in the backward pass): the same loss and gradients, both ways
    for grad, want in (("all", grads), ("last", last)):
        model.config.train_rollout_grad, model.config.train_rollout_remat = grad, True
        again = jax.grad(loss)(params, batch)
        for a, b in zip(jax.tree.leaves(again), jax.tree.leaves(want)):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-7)


def test_rollout_training_memory_on_the_compiled_step(tiny_cache, tmp_path):
    peak = {}
    for name, extra in (("one", []), ("all", ["--train-rollout", "3"]),
                        ("last", ["--train-rollout", "3", "--train-rollout-grad", "last"]),
                        ("remat", ["--train-rollout", "3", "--train-rollout-remat"])):
        result = _train(tiny_cache, tmp_path, name, steps=1, model=extra)
        assert math.isfinite(result["val_loss"])
        peak[name] = result["memory"].peak_bytes
    # backpropagating through 3 steps keeps the activations of each: well above one step; the
    # pushforward trick keeps one step's (and the rolled-out states): within 15% of one step; each
    # step checkpointed keeps its input state and recomputes the step: about half of all steps
    # kept (tiny model, where the states and the longer batch weigh: 1.41x one step, 0.45x all)
    assert peak["all"] > 1.8 * peak["one"] and peak["last"] < 1.15 * peak["one"]
    assert peak["remat"] < 0.55 * peak["all"] and peak["remat"] < 1.6 * peak["one"]


def test_rollout_training_on_eight_devices_matches_one(tiny_cache, tmp_path):
    one = _train(tiny_cache, tmp_path, "one", steps=2, model=["--train-rollout", "2"])
    mesh = _train(tiny_cache, tmp_path, "mesh", steps=2, model=["--train-rollout", "2", "--remat", "full"],
                  mesh="data=2,fsdp=2,tensor=2", zero=3)
    for a, b in zip(_leaves(one["state"]), _leaves(mesh["state"])):
        np.testing.assert_allclose(a, b, rtol=2e-4, atol=1e-5)
    assert mesh["val_loss"] == pytest.approx(one["val_loss"], rel=1e-4)
