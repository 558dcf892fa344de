"""weather-vit: a ClimaX-style vision transformer forecasting a simulated atmosphere, or your fields.

Data (``sciscale_jax.data.weather``): trajectories of a T21 Held-Suarez atmosphere simulated
by dinosaur on first use and cached; 8 channels (geopotential, temperature, winds on sigma
levels, surface pressure) on a 32 x 64 equiangular grid every 6 hours. Whole trajectories are
held out for validation. Or, with ``data`` (``sciscale_jax.data.gridded``), the ``channels`` of
the user's Zarr or NetCDF fields (ERA5, WeatherBench 2), the last states in time held out. Each
channel is normalized by its mean and standard deviation over the training states.

The model (``sciscale_jax.models.climax``) maps the state at t to the state at t + lead and
trains on latitude-weighted MSE over all channels (normalized units); with ``train_rollout`` K
on the mean of that loss over its own autoregressive forecasts at 1 .. K leads (multi-step
fine-tuning, as GraphCast and Aurora do: backpropagating through every step, whose activations
add up, or under ``train_rollout_grad="last"`` through the last alone, the pushforward trick's memory
of one step; the steps run under ``lax.scan``, each checkpointed under ``train_rollout_remat`` so
only its input state is kept for the backward pass). Evaluation (one step at the lead, whatever K), on every
pair of the held-out states: latitude-weighted RMSE per channel in physical units (the
square root of the mean squared error over all pairs, as WeatherBench 2) and the anomaly
correlation (ACC, per state then averaged) against the climatology of the training states
(zonal mean for the zonally symmetric simulation; per day of year and hour for the user's
fields); baselines on the same pairs: persistence (the input state) and climatology. A model
trained on several leads (``max_lead_steps``) is also scored at each other trained lead k
(``loss_lead{k}``, beside ``persistence_loss_lead{k}`` and ``climatology_loss_lead{k}``).
``rollout`` runs the model autoregressively and scores every lead time the same way;
``forecast`` (``sciscale embed``) writes the trained model's forecasts of every state of a store.
"""

from __future__ import annotations

import collections.abc
import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sciscale_jax.axes import BATCH
from sciscale_jax.data import files, gridded
from sciscale_jax.data import weather as wx
from sciscale_jax.models.climax import ClimaX, ClimaXConfig
from sciscale_jax.recipes.base import Data, Recipe

FIELD = (BATCH, None, None, None)


@dataclasses.dataclass(frozen=True)
class WeatherViTConfig(ClimaXConfig):
    """The ClimaX model plus the forecast lead and the data: the simulation, or the user's fields."""

    num_vars: int = dataclasses.field(default=0, metadata={
        "help": "input and output channels (0: one per channel of the data)"})
    lead_steps: int = dataclasses.field(default=1, metadata={"help": "forecast lead in recorded intervals"})
    max_lead_steps: int = dataclasses.field(default=0, metadata={
        "help": "train on leads drawn per example from lead_steps to this many intervals (ClimaX's randomized "
                "lead; 0: lead_steps only); evaluation at lead_steps, and the loss at each other lead"})
    train_rollout: int = dataclasses.field(default=1, metadata={
        "help": "train on autoregressive forecasts of this many steps of lead_steps, the loss averaged over the "
                "steps (GraphCast's and Aurora's multi-step fine-tuning; activations grow with the steps)"})
    train_rollout_grad: str = dataclasses.field(default="all", metadata={
        "choices": ("all", "last"), "help": "with --train-rollout: backpropagate through every step, or through the "
        "last alone, its input rolled out without gradient and only its loss counted (the pushforward trick: the "
        "memory of one step)"})
    train_rollout_remat: bool = dataclasses.field(default=False, metadata={
        "help": "with --train-rollout: keep only each step's input state for the backward pass and recompute the "
                "step (GraphCast's per-step checkpointing: about one step's activations, one more forward per step)"})
    data: str = dataclasses.field(default="", metadata={
        "group": "data", "help": "your gridded fields: Zarr stores or NetCDF files, comma-separated "
                                 "('': the Held-Suarez simulation)"})
    channels: str = dataclasses.field(default="", metadata={
        "group": "data", "help": "with --data: the channels, comma-separated, each a variable or variable@level "
                                 "(geopotential@500,temperature@850,2m_temperature)"})
    static: str = dataclasses.field(default="", metadata={
        "group": "data", "help": "with --data: time-invariant input fields, comma-separated "
                                 "(land_sea_mask,geopotential_at_surface)"})
    val_fraction: float = dataclasses.field(default=0.1, metadata={
        "group": "data", "help": "with --data: the last share of the states held out"})
    val_start: str = dataclasses.field(default="", metadata={
        "group": "data", "help": "with --data: hold out the states from this date on (2018-01-01) instead"})
    truncation: int = dataclasses.field(default=21, metadata={
        "group": "data", "choices": tuple(wx.GAUSSIAN_NODES), "help": "spectral truncation of the simulation"})
    sim_layers: int = dataclasses.field(default=8, metadata={"group": "data", "help": "sigma levels simulated"})
    dt_minutes: float = dataclasses.field(default=120.0, metadata={"group": "data", "help": "simulation time step"})
    spinup_days: float = dataclasses.field(default=25.0, metadata={"group": "data"})
    trajectory_days: float = dataclasses.field(default=25.0, metadata={
        "group": "data", "help": "days recorded per trajectory"})
    interval_hours: int = dataclasses.field(default=6, metadata={
        "group": "data", "help": "hours between states (with --data: a multiple of the data's spacing)"})
    train_trajectories: int = dataclasses.field(default=4, metadata={"group": "data"})
    val_trajectories: int = dataclasses.field(default=2, metadata={"group": "data"})
    data_seed: int = dataclasses.field(default=0, metadata={"group": "data", "help": "seed of the simulation"})
    cache_dir: str = dataclasses.field(default="", metadata={
        "group": "data", "help": "cache root ('': $SCISCALE_CACHE or ~/.cache/sciscale_jax)"})

    def __post_init__(self):
        if not isinstance(self.lead_steps, int) or isinstance(self.lead_steps, bool) or self.lead_steps <= 0:
            raise ValueError(f"lead_steps={self.lead_steps!r} must be a positive integer")
        if not isinstance(self.max_lead_steps, int) or isinstance(self.max_lead_steps, bool) or not (
                self.max_lead_steps == 0 or self.max_lead_steps >= self.lead_steps):
            raise ValueError(f"max_lead_steps={self.max_lead_steps!r} must be 0 or at least lead_steps="
                             f"{self.lead_steps}")
        if not isinstance(self.train_rollout, int) or isinstance(self.train_rollout, bool) or self.train_rollout < 1:
            raise ValueError(f"train_rollout={self.train_rollout!r} must be a positive integer")
        if self.train_rollout > 1 and self.max_lead_steps not in (0, self.lead_steps):
            raise ValueError(f"train_rollout={self.train_rollout} rolls out one lead: it takes no max_lead_steps "
                             f"(got {self.max_lead_steps})")
        if not isinstance(self.train_rollout_remat, bool):
            raise ValueError(f"train_rollout_remat={self.train_rollout_remat!r} must be a bool")
        if self.train_rollout_grad not in ("all", "last"):
            raise ValueError(f"train_rollout_grad={self.train_rollout_grad!r} must be 'all' or 'last'")
        if self.data:
            if not isinstance(self.interval_hours, int) or isinstance(self.interval_hours, bool) \
                    or self.interval_hours <= 0:
                raise ValueError(f"interval_hours={self.interval_hours!r} must be a positive integer")
            if not self.channels:
                raise ValueError("--data needs --channels: the variables to forecast, e.g. "
                                 "geopotential@500,temperature@850,2m_temperature")
            gridded.parse_channels(self.channels)
            if not 0.0 < self.val_fraction < 1.0:
                raise ValueError(f"val_fraction={self.val_fraction} must lie strictly between 0 and 1")
            if self.val_start:
                gridded.parse_date(self.val_start, "val_start")
        elif self.channels or self.val_start or self.static:
            raise ValueError("--channels, --static and --val-start choose from your --data; the simulation has its "
                             f"own {len(wx.VARIABLES)} channels")
        else:
            self.data_config()  # ValueError for a bad simulation setting
        channels = len(self.variables)
        if self.num_vars == 0:
            object.__setattr__(self, "num_vars", channels)
        elif self.num_vars != channels:
            raise ValueError(f"num_vars={self.num_vars} must equal the {channels} channels of the weather data "
                             "(or 0: as many)")
        if self.num_static == 0:
            object.__setattr__(self, "num_static", len(self.static_fields))
        elif self.num_static != len(self.static_fields):
            raise ValueError(f"num_static={self.num_static} must equal the {len(self.static_fields)} static fields "
                             "named by --static")
        super().__post_init__()

    def data_config(self) -> wx.WeatherDataConfig:
        return wx.WeatherDataConfig(truncation=self.truncation, layers=self.sim_layers, dt_minutes=self.dt_minutes,
                                    lat=self.lat, lon=self.lon, spinup_days=self.spinup_days,
                                    days=self.trajectory_days, interval_hours=self.interval_hours,
                                    train_trajectories=self.train_trajectories,
                                    val_trajectories=self.val_trajectories, seed=self.data_seed)

    @property
    def leads(self) -> tuple:
        """The leads trained on, in recorded intervals."""
        return tuple(range(self.lead_steps, max(self.lead_steps, self.max_lead_steps) + 1))

    @property
    def static_fields(self) -> tuple:
        return tuple(n for n in (p.strip() for p in self.static.split(",")) if n)

    @property
    def variables(self) -> tuple:
        if self.data:
            return tuple(c.name for c in gridded.parse_channels(self.channels))
        return tuple(name for _, _, name in wx.channel_levels(self.sim_layers))


def lat_weights(lat: int) -> jnp.ndarray:
    """cos(latitude) of the ``lat`` equiangular cell centres, normalised to mean 1 (float32)."""
    lat_rad = jnp.deg2rad(-90.0 + (jnp.arange(lat, dtype=jnp.float32) + 0.5) * (180.0 / lat))
    w = jnp.cos(lat_rad)
    return w / jnp.mean(w)


def lat_weighted_mse(pred_bvhw, truth_bvhw, weight_b=None):
    """(sum, count) of w(lat) (pred - truth)^2 over batch, variables, latitudes, longitudes."""
    dtype = jnp.promote_types(pred_bvhw.dtype, jnp.float32)  # float32, or float64 for float64 inputs
    err = (pred_bvhw.astype(dtype) - truth_bvhw.astype(dtype)) ** 2
    err = err * lat_weights(err.shape[2]).astype(dtype)[:, None]
    if weight_b is None:
        return jnp.sum(err), jnp.asarray(err.size, jnp.float32)
    return jnp.sum(err * weight_b[:, None, None, None]), jnp.sum(weight_b) * math.prod(err.shape[1:])


def _forecast(model, batch, key=None):
    return model(batch["x"], batch["lead"], batch.get("static"), dropout_key=key)


def loss_fn(model, batch, key):
    """Latitude-weighted MSE of the forecast at the trained lead, in normalized units; with
    ``y_rollout`` (``train_rollout`` K > 1) of the model's own K-step rollout, averaged over the
    steps, or under ``train_rollout_grad="last"`` of its last step alone, whose input (the first K - 1
    steps) carries no gradient."""
    if "y_rollout" not in batch:
        return lat_weighted_mse(_forecast(model, batch, key), batch["y"])
    targets = jnp.concatenate([batch["y"][None], jnp.moveaxis(batch["y_rollout"], 1, 0)])  # [K, B, V, lat, lon]
    keys = None if key is None else jax.random.split(key, len(targets))
    graphdef, variables = nnx.split(model)

    def step(variables, state, key):  # one application of the model to its own forecast
        return nnx.merge(graphdef, variables)(state, batch["lead"], batch.get("static"), dropout_key=key)

    if getattr(model.config, "train_rollout_remat", False):  # keep each step's input; recompute the step
        step = jax.checkpoint(step)

    def scored(carry, target_key):
        state, total, count = carry
        state = step(variables, state, target_key[1])
        s, n = lat_weighted_mse(state, target_key[0])
        return (state, total + s, count + n), None

    zero = jnp.zeros((), jnp.float32)
    if getattr(model.config, "train_rollout_grad", "all") == "last":  # K - 1 steps without gradient, the last scored
        frozen = jax.lax.stop_gradient(variables)
        state = jax.lax.scan(lambda x, tk: (step(frozen, x, tk[1]), None), batch["x"],
                             (targets[:-1], None if keys is None else keys[:-1]))[0]
        (_, total, count), _ = scored((jax.lax.stop_gradient(state), zero, zero),
                                      (targets[-1], None if keys is None else keys[-1]))
        return total, count
    (_, total, count), _ = jax.lax.scan(scored, (batch["x"], zero, zero), (targets, keys))
    return total, count


def eval_fn(model, batch) -> dict:
    """The loss, and per channel the lat-weighted MSE in physical units and the ACC (sum, count) pairs,
    at the evaluated lead (``lead_steps``); for a run trained on several leads (``max_lead_steps``)
    also ``loss_lead{k}`` at each other trained lead k (batches carry ``lead_index``: the position
    of their lead in ``config.leads``; a batch adds nothing to another lead's figures)."""
    pred = _forecast(model, batch)
    valid = batch["valid"]
    index = batch.get("lead_index")
    main = valid if index is None else valid * (index == 0)
    out = {"loss": lat_weighted_mse(pred, batch["y"], main)}
    out.update(channel_metrics(pred, batch["y"], batch["clim"], batch["scale"], main, model.config.variables))
    if index is not None:
        for j, k in enumerate(model.config.leads[1:], start=1):
            out[f"loss_lead{k}"] = lat_weighted_mse(pred, batch["y"], valid * (index == j))
    return out


def channel_metrics(pred_bvhw, truth_bvhw, clim_bvhw, scale_bv, valid_b, names) -> dict:
    w_h1 = lat_weights(pred_bvhw.shape[2])[:, None]
    pred, truth = pred_bvhw.astype(jnp.float32), truth_bvhw.astype(jnp.float32)
    se_bv = jnp.mean((pred - truth) ** 2 * w_h1, axis=(2, 3)) * scale_bv ** 2
    fa, ta = pred - clim_bvhw, truth - clim_bvhw
    acc_bv = jnp.sum(w_h1 * fa * ta, axis=(2, 3)) / jnp.sqrt(
        jnp.maximum(jnp.sum(w_h1 * fa * fa, axis=(2, 3)) * jnp.sum(w_h1 * ta * ta, axis=(2, 3)), 1e-30))
    n = jnp.sum(valid_b)
    out = {}
    for i, name in enumerate(names):
        out[f"mse_{name}"] = (jnp.sum(se_bv[:, i] * valid_b), n)
        out[f"acc_{name}"] = (jnp.sum(acc_bv[:, i] * valid_b), n)
    return out


def summarize(means: dict) -> dict:
    return {"rmse_" + k[4:]: math.sqrt(v) for k, v in means.items() if k.startswith("mse_") and v >= 0}


@dataclasses.dataclass(frozen=True)
class Prepared:
    """What evaluation and rollouts need beyond the batches."""

    weather: wx.WeatherData | gridded.FieldData  # .train, .val, .variables, .lat, .interval_hours
    normalizer: wx.Normalizer
    val_norm: np.ndarray     # held-out states [N, T, V, lat, lon], normalized
    clim_norm: np.ndarray    # the climatology of each held-out state [N, T, V, lat, lon], normalized
    clim: np.ndarray         # the same in physical units
    climatology: str = "zonal mean of the training trajectories"  # what ``clim`` is
    static_norm: np.ndarray | None = None  # [S, lat, lon] time-invariant inputs, each field standardized


def prepare(model_cfg: WeatherViTConfig, log=print) -> Prepared:
    """The simulation, whose climate is zonally symmetric and constant (zonal-mean climatology),
    or the user's fields: the per-day-of-year, per-hour climatology of the training states
    (``gridded.seasonal_climatology``, 61-day window) when they span a year, else their time mean
    per grid point."""
    if model_cfg.data:
        weather = gridded.read_fields(model_cfg.data, model_cfg.channels, interval_hours=model_cfg.interval_hours,
                                      val_fraction=model_cfg.val_fraction, val_start=model_cfg.val_start,
                                      min_states=model_cfg.leads[-1] + 1, static=model_cfg.static_fields)
        times = weather.train_times
        if times[-1] - times[0] >= np.timedelta64(365, "D"):
            clim = gridded.seasonal_climatology(weather.train[0], times, weather.val_times)[None]
            kind = "per day of year and hour of the training states (61-day window)"
        else:
            clim = np.broadcast_to(wx.time_mean_climatology(weather.train), weather.val.shape)
            kind = "time mean of the training states per grid point (they span less than a year)"
    else:
        weather = wx.load_weather(model_cfg.data_config(), model_cfg.cache_dir or None, log=log)
        clim = np.broadcast_to(wx.zonal_climatology(weather.train), weather.val.shape)
        kind = Prepared.climatology
    norm = wx.Normalizer(weather.train)
    static = getattr(weather, "static", None)
    if static is not None:
        mean, std = static.astype(np.float64).mean(axis=(1, 2)), static.astype(np.float64).std(axis=(1, 2))
        if np.any(std <= 0):
            raise ValueError(f"static field {model_cfg.static_fields[int(np.argmin(std))]!r} is constant; "
                             "it tells the model nothing")
        static = ((static - mean[:, None, None]) / std[:, None, None]).astype(np.float32)
    return Prepared(weather, norm, norm(weather.val), norm(clim), clim, kind, static)


def baselines(prep: Prepared, lead_steps: int, piece: int = 256, *, channels: bool = True) -> dict:
    """Persistence and climatology on every held-out pair: normalized loss, and with ``channels``
    RMSE per channel and persistence ACC.

    Summed over pieces of ``piece`` pairs, so no float64 copy of the held-out states is made."""
    val, lat = prep.weather.val, prep.weather.lat
    pers, clim, acc, count = 0.0, 0.0, 0.0, 0
    for i in range(val.shape[0]):
        for s in range(0, val.shape[1] - lead_steps, piece):
            e = min(s + piece, val.shape[1] - lead_steps)
            x, y, c = val[i, s:e], val[i, s + lead_steps:e + lead_steps], prep.clim[i, s + lead_steps:e + lead_steps]
            pers = pers + wx.lat_weighted_mse(x, y, lat) * (e - s)
            clim = clim + wx.lat_weighted_mse(c, y, lat) * (e - s)
            if channels:
                acc = acc + wx.lat_weighted_acc(x, y, c, lat) * (e - s)
            count += e - s
    pers, clim, acc = pers / count, clim / count, acc / count
    var = prep.normalizer.std.astype(np.float64) ** 2  # normalized differences; the mean cancels
    out = {"persistence_loss": float((pers / var).mean()), "climatology_loss": float((clim / var).mean())}
    if not channels:
        return out
    for i, name in enumerate(prep.weather.variables):
        out[f"persistence_rmse_{name}"] = math.sqrt(pers[i])
        out[f"climatology_rmse_{name}"] = math.sqrt(clim[i])
        out[f"persistence_acc_{name}"] = float(acc[i])
    return out


def build_data(train_cfg, model_cfg) -> Data:
    prep = prepare(model_cfg)
    kw = dict(lead_steps=model_cfg.lead_steps, interval_hours=prep.weather.interval_hours,
              batch_size=train_cfg.batch_size, seed=train_cfg.seed, static=prep.static_norm)
    train = wx.ForecastBatches(prep.normalizer(prep.weather.train), max_lead_steps=model_cfg.max_lead_steps,
                               rollout_steps=model_cfg.train_rollout, **kw)
    train.prepared = prep  # for rollouts after training
    evals = _eval_batches(prep, model_cfg, kw)
    user = isinstance(prep.weather, gridded.FieldData)
    summary = f"{prep.weather.summary()}; climatology: {prep.climatology}" if user else ""
    if model_cfg.static_fields:
        summary += f"; static fields: {', '.join(model_cfg.static_fields)}"
    figures = baselines(prep, model_cfg.lead_steps)
    for k in model_cfg.leads[1:]:  # a multi-lead run: the loss baselines at each other trained lead
        figures.update({f"{name}_lead{k}": value for name, value in baselines(prep, k, channels=False).items()})
    return Data(train=train, eval=evals, baselines=figures, sources=prep.weather.sources if user else {},
                summary=summary, train_only=("y_rollout",),  # evaluation: one step at the lead
                stats=training_stats(prep))  # what forecasts need of the training data (sciscale embed)


def training_stats(prep: Prepared) -> dict:
    """What a forecast needs of the training data (``Data.stats``): the per-variable mean and
    standard deviation, the interval in hours and, where there are any, the standardized static
    fields."""
    stats = {"mean": prep.normalizer.mean, "std": prep.normalizer.std,
             "interval_hours": np.int64(prep.weather.interval_hours)}
    if prep.static_norm is not None:
        stats["static_norm"] = prep.static_norm
    return stats


def _eval_batches(prep: Prepared, model_cfg, kw: dict):
    """Every held-out pair at ``lead_steps``; for a multi-lead run also at each other trained lead
    (tagged ``lead_index``), one after the other."""
    extra = {"scale": prep.normalizer.std}
    if len(model_cfg.leads) == 1:
        return wx.ForecastBatches(prep.val_norm, **kw).eval_batches(extra, targets={"clim": prep.clim_norm})
    return _Chained([wx.ForecastBatches(prep.val_norm, **{**kw, "lead_steps": k}).eval_batches(
        {**extra, "lead_index": np.int32(j)}, targets={"clim": prep.clim_norm}) for j, k in enumerate(model_cfg.leads)])


class _Chained(collections.abc.Sequence):
    """Sequences of batches one after the other, each batch built when read."""

    def __init__(self, parts):
        self.parts = list(parts)
        self.starts = np.cumsum([0] + [len(p) for p in self.parts])

    def __len__(self) -> int:
        return int(self.starts[-1])

    def __getitem__(self, i: int) -> dict:
        if not -len(self) <= i < len(self):
            raise IndexError(f"evaluation batch {i} of {len(self)}")
        i %= len(self)
        part = int(np.searchsorted(self.starts, i, side="right")) - 1
        return self.parts[part][i - int(self.starts[part])]


def _check_grid(model_cfg, variables, lat, lon, what: str) -> None:
    if tuple(variables) != model_cfg.variables or (len(lat), len(lon)) != (model_cfg.lat, model_cfg.lon):
        hint = f" (pass --lat {len(lat)} --lon {len(lon)})" if (len(lat), len(lon)) != (model_cfg.lat, model_cfg.lon) \
            else ""
        raise ValueError(f"{what} has channels {tuple(variables)} on ({len(lat)}, {len(lon)}) but the model expects "
                         f"{model_cfg.variables} on ({model_cfg.lat}, {model_cfg.lon}){hint}")
    expected = -90.0 + (np.arange(model_cfg.lat) + 0.5) * 180.0 / model_cfg.lat
    if not np.allclose(lat, expected, atol=1e-4):
        raise ValueError(f"{what}'s latitudes ({lat[0]:g} to {lat[-1]:g}) are not the equiangular cell centres "
                         f"the loss weights assume ({expected[0]:g} to {expected[-1]:g}); regrid them, e.g. to "
                         "WeatherBench 2's 64 x 32 equiangular conservative grid")


def abstract_batch(model_cfg, train_cfg) -> dict:
    """The shapes of one training batch (``ForecastBatches.batch``), from the settings alone."""
    b, grid = train_cfg.batch_size, (model_cfg.lat, model_cfg.lon)
    field = jax.ShapeDtypeStruct((b, model_cfg.num_vars, *grid), np.float32)
    out = {"x": field, "y": field, "lead": jax.ShapeDtypeStruct((b,), np.float32)}
    if model_cfg.num_static:
        out["static"] = jax.ShapeDtypeStruct((b, model_cfg.num_static, *grid), np.float32)
    if model_cfg.train_rollout > 1:
        out["y_rollout"] = jax.ShapeDtypeStruct((b, model_cfg.train_rollout - 1, model_cfg.num_vars, *grid),
                                                np.float32)
    return out


def check(model_cfg, train_cfg, data) -> None:
    trains_head = "head" in model_cfg.lora_train_names
    if model_cfg.lora_rank and model_cfg.residual and not train_cfg.init_from and not trains_head:
        raise ValueError(f"lora_rank={model_cfg.lora_rank} without --init-from: LoRA freezes the head, and a new "
                         "residual model's head is zero, so nothing would train; start from a pretrained run "
                         "(or train the head too: --lora-train head)")
    weather = data.train.prepared.weather
    _check_grid(model_cfg, weather.variables, weather.lat, weather.lon, "the weather data")


def _forecaster(model, static_norm, batch_size: int):
    """``run(x, hours)``: the model's forecasts of normalized states ``x`` [n, V, lat, lon] at a lead
    of ``hours``, in batches of ``batch_size`` (the last padded with its last state, so one program
    is compiled)."""
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    apply = jax.jit(lambda p, r, x, h: nnx.merge(graphdef, p, r)(x, jnp.full((x.shape[0],), h, jnp.float32),
                                                                static_norm))

    def run(x, hours):
        out = []
        for s in range(0, len(x), batch_size):
            chunk = x[s:s + batch_size]
            pad = batch_size - len(chunk)
            padded = np.concatenate([chunk, np.repeat(chunk[-1:], pad, 0)]) if pad else chunk
            out.append(np.asarray(apply(params, rest, padded, np.float32(hours)))[:len(chunk)])
        return np.concatenate(out)

    return run


def forecast(model_cfg, model, path, batch_size: int = 16, *, data_files: dict | None = None,
             data_stats: dict | None = None) -> dict:
    """The trained model's forecasts at every lead it trained on from every state of the Zarr/NetCDF
    stores ``path`` (comma-separated; the run's channels and grid, any spacing in time), for
    ``sciscale embed``.

    Normalized by the statistics of the run's training data: ``data_stats``, what the run saved of
    them (``build_data``'s ``Data.stats``: per-variable mean and standard deviation, the interval,
    the standardized static fields), else computed from the training data read again (a run saved
    without them; with ``data_files``, the digests the run recorded, a store whose values changed
    since is refused). Returns ``forecast`` [leads, T, V, lat, lon] in the stores' units,
    ``lead_hours`` [leads], ``time`` [T] (the states forecast from), ``valid_time`` [leads, T],
    ``variables``, ``lat`` and ``lon``.
    """
    if data_stats is None:
        prep = prepare(model_cfg, log=lambda *_: None)
        changed = files.changed(data_files or {}, getattr(prep.weather, "sources", {}))
        if changed:
            raise ValueError(f"the run's training data changed since it trained, so its normalization would too: "
                             f"{'; '.join(changed)}")
        data_stats = training_stats(prep)
    normalize = wx.Normalizer.of(data_stats["mean"], data_stats["std"])
    static_norm = data_stats.get("static_norm")
    grid = (len(model_cfg.static_fields), model_cfg.lat, model_cfg.lon)
    if normalize.mean.shape != (len(model_cfg.variables),) or (model_cfg.static_fields and (
            static_norm is None or static_norm.shape != grid)):
        raise ValueError(f"the run's saved data statistics do not fit its model: {len(normalize.mean)} variable(s) "
                         f"for {len(model_cfg.variables)}, static fields "
                         f"{None if static_norm is None else static_norm.shape} for {grid}")
    channels = model_cfg.channels if model_cfg.data else ",".join(model_cfg.variables)
    series = gridded.read_series(path, channels, interval_hours=None, what="--input")
    _check_grid(model_cfg, model_cfg.variables, series.lat, series.lon, f"--input {path}")
    run = _forecaster(model, static_norm, batch_size)
    x = normalize(series.values)
    mean, std = normalize.mean[:, None, None], normalize.std[:, None, None]
    hours = [k * int(data_stats["interval_hours"]) for k in model_cfg.leads]
    out = np.empty((len(hours), *x.shape), np.float32)
    for n, h in enumerate(hours):
        out[n] = run(x, h) * std + mean
    lead = np.asarray(hours, np.int64)
    return {"forecast": out, "lead_hours": lead, "time": series.times,
            "valid_time": series.times[None] + lead[:, None].astype("timedelta64[h]"),
            "variables": np.asarray(model_cfg.variables), "lat": series.lat, "lon": series.lon}


def forecast_dataset(model_cfg, arrays):
    """:func:`forecast`'s arrays in WeatherBench 2's forecast layout: one variable per forecast
    variable over (``time``, ``prediction_timedelta``, [``level``,] ``latitude``, ``longitude``),
    the channels of a variable at several levels stacked on ``level`` (NaN at a level a variable
    was not forecast at)."""
    import xarray as xr

    channels = gridded.parse_channels(",".join(str(v) for v in arrays["variables"]))
    fc = np.moveaxis(arrays["forecast"], 0, 1)  # [T, leads, V, lat, lon]
    levels = sorted({c.level for c in channels if c.level is not None})
    out = {}
    for var in dict.fromkeys(c.variable for c in channels):
        idx = [i for i, c in enumerate(channels) if c.variable == var]
        if channels[idx[0]].level is None:
            out[var] = (("time", "prediction_timedelta", "latitude", "longitude"), fc[:, :, idx[0]])
            continue
        stacked = np.full((*fc.shape[:2], len(levels), *fc.shape[3:]), np.nan, np.float32)
        for i in idx:
            stacked[:, :, levels.index(channels[i].level)] = fc[:, :, i]
        out[var] = (("time", "prediction_timedelta", "level", "latitude", "longitude"), stacked)
    coords = {"time": arrays["time"].astype("datetime64[ns]"),
              "prediction_timedelta": np.asarray(arrays["lead_hours"]).astype("timedelta64[h]").astype(
                  "timedelta64[ns]"),
              "latitude": arrays["lat"], "longitude": arrays["lon"]}
    if levels:
        coords["level"] = np.asarray(levels, np.int64 if all(float(v).is_integer() for v in levels) else np.float64)
    return xr.Dataset(out, coords=coords, attrs={"source": "sciscale_jax weather-vit forecast"})


# --- autoregressive rollouts --------------------------------------------------------------------------------

def trained_model(model_cfg, state) -> ClimaX:
    """The model of a finished run: ``train(...)["state"]`` merged into a fresh module on one device."""
    graphdef, _, _ = nnx.split(ClimaX(model_cfg, rngs=nnx.Rngs(0)), nnx.Param, ...)
    return nnx.merge(graphdef, *jax.device_get((state.params, state.rest)))


def rollout(model, prep: Prepared, lead_steps: int, max_steps: int, *, every: int = 4, batch_size: int = 32,
            direct: bool = False, room: int | None = None) -> dict:
    """RMSE per channel at leads 1..``max_steps`` x the trained lead, model vs persistence vs climatology.

    Forecasts start at every ``every``-th state of the held-out trajectories that leaves room
    for ``room`` (default ``max_steps``) applications of the model, so scores of different
    lengths can share their starts. With ``direct``, lead k x ``lead_steps`` is one application
    of the model at that lead (a model trained with ``max_lead_steps``) instead of k applications
    at ``lead_steps``. Returns ``{"lead_hours": [...], "model" | "persistence" | "climatology":
    {channel: [rmse per lead]}, "starts": n}``.
    """
    val = prep.val_norm
    n, t = val.shape[:2]
    if room is not None and room < max_steps:
        raise ValueError(f"room={room} must be at least max_steps={max_steps}")
    span = lead_steps * (max_steps if room is None else room)
    starts = [(i, j) for i in range(n) for j in range(0, t - span, every)]
    if not starts:
        raise ValueError(f"held-out trajectories of {t} states are too short for {max_steps} steps of lead "
                         f"{lead_steps}")
    run = _forecaster(model, prep.static_norm, batch_size)
    hours = lead_steps * prep.weather.interval_hours
    std = prep.normalizer.std.astype(np.float64)
    lat, names = prep.weather.lat, prep.weather.variables
    se = {k: np.zeros((max_steps, len(names))) for k in ("model", "persistence", "climatology")}
    for s in range(0, len(starts), batch_size):
        chunk = starts[s:s + batch_size]
        x0 = state = np.stack([val[i, j] for i, j in chunk])
        for k in range(1, max_steps + 1):
            state = run(x0, k * hours) if direct else run(state, hours)
            truth = np.stack([val[i, j + k * lead_steps] for i, j in chunk])
            preds = {"model": state, "persistence": x0,
                     "climatology": np.stack([prep.clim_norm[i, j + k * lead_steps] for i, j in chunk])}
            for name, pred in preds.items():
                se[name][k - 1] += wx.lat_weighted_mse(pred, truth, lat) * len(chunk)
    out = {"lead_hours": [hours * k for k in range(1, max_steps + 1)], "starts": len(starts)}
    for name, total in se.items():
        rmse = np.sqrt(total / len(starts)) * std
        out[name] = {ch: rmse[:, i].tolist() for i, ch in enumerate(names)}
    return out


RECIPE = Recipe(
    name="weather-vit",
    description="ClimaX-style ViT forecasting a Held-Suarez atmosphere simulated by dinosaur, or your "
                "Zarr/NetCDF fields",
    config_class=WeatherViTConfig,
    model_defaults=dict(num_layers=4, num_heads=4, embed_dim=128, mlp_dim=256, patch_size=4),
    train_defaults=dict(steps=400, batch_size=16, learning_rate=2e-3, warmup_steps=40, eval_every=200,
                        save_every=200),
    build_model=lambda config, rngs: ClimaX(config, rngs=rngs),
    build_data=build_data,
    loss_fn=loss_fn,
    eval_fn=eval_fn,
    summarize=summarize,
    batch_axes={"x": FIELD, "y": FIELD, "clim": FIELD, "static": FIELD, "lead": (BATCH,), "valid": (BATCH,),
                "y_rollout": (BATCH, None, None, None, None),
                "scale": (BATCH, None), "lead_index": (BATCH,)},
    check=check,
    embed=forecast,
    abstract_batch=abstract_batch,
    embed_dataset=forecast_dataset,
    embed_reads_data=True,
    data_files_are_bytes=False,  # the SHA-256 of the values read: checked once they are read
)
