"""Weather data: trajectories of a Held-Suarez atmosphere simulated by dinosaur, cached on disk.

The atmosphere is the dry primitive equations on sigma levels under Held & Suarez (1994)
forcing (Newtonian relaxation to a zonally symmetric radiative-equilibrium temperature,
Rayleigh drag in the boundary layer), solved by ``dinosaur``, the spectral dynamical core of
NeuralGCM (Kochkov et al. 2024): triangular truncation T21 by default, 8 equidistant sigma
levels, a semi-implicit IMEX Runge-Kutta step (SIL3) with an exponential spectral filter.

Each trajectory starts from rest at the Held-Suarez equilibrium temperature plus Gaussian
noise of 0.1 K drawn from its own seed; baroclinic instability grows out of the noise, so
trajectories are independent. After ``spinup_days`` the state is recorded every
``interval_hours``. The recorded prognostic variables are evaluated from their spherical
harmonic coefficients on an equiangular latitude-longitude grid (``lat`` x ``lon`` cell
centres, south to north), so the output grid is exact spectral interpolation, independent of
the simulation's Gaussian grid. Channels (``VARIABLES``): geopotential, temperature and
winds on the sigma levels nearest the targets, and surface pressure; a channel is named by
its variable and 1000 x sigma (``t812`` is temperature at sigma 0.8125, near 812 hPa).

The first ``train_trajectories`` are for training, the rest are held out. Generation runs
once per configuration and is cached under ``cache_root()`` (``$SCISCALE_CACHE`` or
``~/.cache/sciscale_jax``) as ``fields.npy`` plus ``manifest.json`` holding the
configuration, the array's shape and its SHA-256. A cache whose manifest is missing,
unreadable, for another configuration, or whose array does not match its checksum is
rebuilt, never used. Generation runs with 64-bit types off, so the arrays are the same
whatever ``jax_enable_x64`` says; they are deterministic on a given machine and jax version
(a chaotic system amplifies the last bit that another CPU's instruction set may change).
"""

from __future__ import annotations

import collections.abc
import dataclasses
import functools
import hashlib
import importlib.util
import json
import os
import pathlib
import shutil
import time

import numpy as np

from sciscale_jax.data import cache as data_cache
from sciscale_jax.data.rows import check_rows

WEATHER_EXTRA = 'weather data needs dinosaur: pip install -e ".[weather]"'
FORMAT = 1  # bump when the generated content changes for the same configuration
# (variable, target sigma); None: a surface field
VARIABLES = (("z", 0.5), ("t", 0.5), ("t", 0.85), ("u", 0.25), ("u", 0.85), ("v", 0.25), ("v", 0.85), ("ps", None))
UNITS = {"z": "m2/s2", "t": "K", "u": "m/s", "v": "m/s", "ps": "hPa"}
GAUSSIAN_NODES = {21: 16, 31: 24, 42: 32}  # Gaussian nodes per hemisphere of the T21/T31/T42 grids
NOISE_KELVIN = 0.1


@dataclasses.dataclass(frozen=True)
class WeatherDataConfig:
    """What the cached trajectories depend on (any change is another cache entry)."""

    truncation: int = 21          # spectral truncation T<n>: 21, 31 or 42
    layers: int = 8               # equidistant sigma levels
    dt_minutes: float = 120.0     # time step of the dynamical core
    lat: int = 32                 # output grid: equiangular latitudes (cell centres)
    lon: int = 64                 # output grid: longitudes from 0
    spinup_days: float = 25.0
    days: float = 25.0            # recorded per trajectory
    interval_hours: int = 6       # between recorded states
    train_trajectories: int = 4
    val_trajectories: int = 2
    seed: int = 0

    def __post_init__(self):
        if self.truncation not in GAUSSIAN_NODES:
            raise ValueError(f"truncation={self.truncation} must be one of {sorted(GAUSSIAN_NODES)}")
        for name in ("layers", "lat", "lon", "interval_hours", "train_trajectories", "val_trajectories"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"{name}={value!r} must be a positive integer")
        if self.lon < self.truncation + 1:
            raise ValueError(f"lon={self.lon} must be at least truncation + 1 = {self.truncation + 1} (the output "
                             "grid evaluates every zonal wavenumber of the simulation)")
        if self.layers < 2:
            raise ValueError(f"layers={self.layers} must be at least 2")
        if not (self.dt_minutes > 0 and (self.interval_hours * 60) % self.dt_minutes == 0):
            raise ValueError(f"dt_minutes={self.dt_minutes} must be positive and divide "
                             f"interval_hours={self.interval_hours} x 60 minutes")
        if self.spinup_days < 0 or self.days * 24 < self.interval_hours:
            raise ValueError(f"spinup_days={self.spinup_days} must be >= 0 and days={self.days} must cover at "
                             f"least one interval of {self.interval_hours} h")

    @property
    def num_trajectories(self) -> int:
        return self.train_trajectories + self.val_trajectories

    @property
    def steps_per_interval(self) -> int:
        return int(round(self.interval_hours * 60 / self.dt_minutes))

    @property
    def spinup_intervals(self) -> int:
        return int(round(self.spinup_days * 24 / self.interval_hours))

    @property
    def num_times(self) -> int:
        """Recorded states per trajectory (the first at the end of the spin-up)."""
        return int(self.days * 24 // self.interval_hours) + 1

    def key(self) -> str:
        text = json.dumps({"format": FORMAT, **dataclasses.asdict(self)}, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]


@dataclasses.dataclass(frozen=True)
class WeatherData:
    """Trajectories ``fields`` [trajectory, time, variable, lat, lon] in physical units (float32)."""

    fields: np.ndarray
    variables: tuple
    lat: np.ndarray          # degrees, south to north
    lon: np.ndarray          # degrees
    config: WeatherDataConfig

    @property
    def train(self) -> np.ndarray:
        return self.fields[: self.config.train_trajectories]

    @property
    def val(self) -> np.ndarray:
        return self.fields[self.config.train_trajectories:]

    @property
    def interval_hours(self) -> int:
        return self.config.interval_hours


# --- the cache ----------------------------------------------------------------------------------------------

def cache_root(cache_dir: str | os.PathLike | None = None) -> pathlib.Path:
    """``cache_dir``, else ``$SCISCALE_CACHE``, else ``~/.cache/sciscale_jax``."""
    return pathlib.Path(cache_dir) if cache_dir else data_cache.cache_root()


def cache_path(config: WeatherDataConfig, cache_dir=None) -> pathlib.Path:
    return cache_root(cache_dir) / "weather" / f"held-suarez-{config.key()}"


def _sha256(path: pathlib.Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def check_cache(path: pathlib.Path, config: WeatherDataConfig) -> str | None:
    """None if the cache at ``path`` is complete and intact for ``config``; else why not."""
    manifest_file, array_file = path / "manifest.json", path / "fields.npy"
    if not manifest_file.is_file():
        return "no manifest"
    try:
        manifest = json.loads(manifest_file.read_text())
    except (OSError, ValueError):
        return "unreadable manifest"
    if manifest.get("config") != {"format": FORMAT, **dataclasses.asdict(config)}:
        return "manifest for another configuration"
    if not array_file.is_file():
        return "no fields.npy"
    if array_file.stat().st_size != manifest.get("bytes") or _sha256(array_file) != manifest.get("sha256"):
        return "fields.npy does not match its checksum"
    return None


def _read(path: pathlib.Path, config: WeatherDataConfig) -> WeatherData:
    manifest = json.loads((path / "manifest.json").read_text())
    fields = np.load(path / "fields.npy", allow_pickle=False)
    if list(fields.shape) != manifest["shape"] or fields.dtype != np.float32:
        raise ValueError(f"weather cache {path}: array {fields.shape} {fields.dtype} disagrees with its manifest")
    return WeatherData(fields, tuple(manifest["variables"]), np.asarray(manifest["lat"]), np.asarray(manifest["lon"]),
                       config)


def _write(path: pathlib.Path, config: WeatherDataConfig, data: WeatherData, seconds: float) -> None:
    """Write into a private folder, manifest last, then rename it into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    np.save(tmp / "fields.npy", data.fields, allow_pickle=False)
    array_file = tmp / "fields.npy"
    manifest = {"config": {"format": FORMAT, **dataclasses.asdict(config)}, "variables": list(data.variables),
                "units": [UNITS[v.rstrip("0123456789")] for v in data.variables],
                "lat": data.lat.tolist(), "lon": data.lon.tolist(), "shape": list(data.fields.shape),
                "bytes": array_file.stat().st_size, "sha256": _sha256(array_file), "seconds": round(seconds, 1),
                "versions": _versions()}
    (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1))
    if path.exists():  # a broken entry (checked by the caller) or one another process just finished
        if check_cache(path, config) is None:
            shutil.rmtree(tmp)
            return
        shutil.rmtree(path)
    try:
        tmp.rename(path)
    except OSError:  # another process renamed its copy in first
        shutil.rmtree(tmp, ignore_errors=True)
        if check_cache(path, config) is not None:
            raise


def _versions() -> dict:
    import jax

    out = {"jax": jax.__version__}
    try:
        import dinosaur
        out["dinosaur"] = getattr(dinosaur, "__version__", "?")
    except ImportError:
        pass
    return out


def load_weather(config: WeatherDataConfig = WeatherDataConfig(), cache_dir=None, *, log=print) -> WeatherData:
    """The trajectories of ``config``: read from the cache if intact, else simulated and cached."""
    path = cache_path(config, cache_dir)
    problem = check_cache(path, config) if path.exists() else "not cached"
    if problem is None:
        return _read(path, config)
    if path.exists():
        log(f"weather cache {path}: {problem}; rebuilding")
    t0 = time.perf_counter()
    data = simulate(config, log=log)
    seconds = time.perf_counter() - t0
    _write(path, config, data, seconds)
    log(f"weather data: {config.num_trajectories} Held-Suarez trajectories simulated in {seconds:.0f} s, "
        f"cached in {path}")
    return data


# --- the simulation -----------------------------------------------------------------------------------------

def _dinosaur():
    if importlib.util.find_spec("dinosaur") is None:
        raise ImportError(WEATHER_EXTRA)
    try:
        from dinosaur import (coordinate_systems, held_suarez, primitive_equations, primitive_equations_states,
                              scales, sigma_coordinates, spherical_harmonic, time_integration, xarray_utils)
    except ImportError as err:
        raise ImportError(f"{WEATHER_EXTRA} ({err})") from err
    return dict(coordinate_systems=coordinate_systems, held_suarez=held_suarez, primitive_equations=primitive_equations,
                states=primitive_equations_states, scales=scales, sigma_coordinates=sigma_coordinates,
                spherical_harmonic=spherical_harmonic, time_integration=time_integration, xarray_utils=xarray_utils)


def channel_levels(layers: int) -> list[tuple[str, int | None, str]]:
    """(variable, layer index or None, channel name) of each channel for ``layers`` equidistant levels."""
    centers = (np.arange(layers) + 0.5) / layers
    out = []
    for var, sigma in VARIABLES:
        if sigma is None:
            out.append((var, None, var))
        else:
            k = int(np.argmin(np.abs(centers - sigma)))
            out.append((var, k, f"{var}{int(round(1000 * centers[k]))}"))
    return out


@functools.lru_cache(maxsize=4)
def _model(truncation: int, layers: int, dt_minutes: float, steps_per_interval: int, lat: int, lon: int):
    """Jitted functions of one configuration: init(keys), advance(states), fields(states)."""
    import jax
    import jax.numpy as jnp

    d = _dinosaur()
    units = d["scales"].units
    grid = d["spherical_harmonic"].Grid.construct(max_wavenumber=truncation, gaussian_nodes=GAUSSIAN_NODES[truncation])
    coords = d["coordinate_systems"].CoordinateSystem(
        horizontal=grid, vertical=d["sigma_coordinates"].SigmaCoordinates.equidistant(layers))
    specs = d["primitive_equations"].PrimitiveEquationsSpecs.from_si()
    p0 = 1e5 * units.pascal
    _, aux = d["states"].isothermal_rest_atmosphere(coords, specs, p0=p0)
    ref_temps = aux[d["xarray_utils"].REF_TEMP_KEY]
    orography = d["primitive_equations"].truncated_modal_orography(aux[d["xarray_utils"].OROGRAPHY], coords)
    dynamics = d["primitive_equations"].PrimitiveEquations(ref_temps, orography, coords, specs)
    forcing = d["held_suarez"].HeldSuarezForcing(coords=coords, physics_specs=specs, reference_temperature=ref_temps,
                                                 p0=p0)
    ti = d["time_integration"]
    dt = specs.nondimensionalize(dt_minutes * units.minute)
    step = ti.imex_rk_sil3(ti.compose_equations([dynamics, forcing]), dt)
    step = ti.step_with_filters(step, [ti.exponential_step_filter(grid, dt, tau=0.0087504, order=1.5, cutoff=0.8)])
    advance = ti.repeated(step, steps_per_interval)

    nondim_p0 = specs.nondimensionalize(p0)
    kelvin = specs.nondimensionalize(1.0 * units.degK)
    sim_shape = coords.nodal_shape

    def init(key):
        t_eq = forcing.equilibrium_temperature(jnp.full(coords.surface_nodal_shape, nondim_p0))
        noise = NOISE_KELVIN * kelvin * jax.random.normal(key, sim_shape, jnp.float32)
        t_var = grid.to_modal(t_eq - ref_temps[:, None, None] + noise)
        zeros = jnp.zeros_like(t_var)
        log_ps = grid.to_modal(jnp.full(coords.surface_nodal_shape, jnp.log(nondim_p0)))
        return d["primitive_equations"].State(vorticity=zeros, divergence=zeros, temperature_variation=t_var,
                                             log_surface_pressure=log_ps)

    out_grid = d["spherical_harmonic"].Grid(
        longitude_wavenumbers=grid.longitude_wavenumbers, total_wavenumbers=grid.total_wavenumbers,
        longitude_nodes=lon, latitude_nodes=lat, latitude_spacing="equiangular")
    per = {"m/s": specs.nondimensionalize(1.0 * units.meter / units.second),
           "m2/s2": specs.nondimensionalize(1.0 * units.meter ** 2 / units.second ** 2),
           "hPa": specs.nondimensionalize(100.0 * units.pascal), "K": kelvin}
    channels = channel_levels(layers)

    def fields(state):
        """Nodal channels [variable, lat, lon] on the output grid, in physical units."""
        u, v = d["spherical_harmonic"].vor_div_to_uv_nodal(out_grid, state.vorticity, state.divergence)
        temp = ref_temps[:, None, None] + out_grid.to_nodal(state.temperature_variation)
        z = d["primitive_equations"].get_geopotential_on_sigma(
            temp, nodal_orography=jnp.zeros(temp.shape[1:], temp.dtype), sigma=coords.vertical,
            gravity_acceleration=specs.g, ideal_gas_constant=specs.R)
        ps = jnp.exp(out_grid.to_nodal(state.log_surface_pressure))[0]
        by_name = {"u": u / per["m/s"], "v": v / per["m/s"], "t": temp / per["K"], "z": z / per["m2/s2"]}
        out = [ps / per["hPa"] if var == "ps" else by_name[var][k] for var, k, _ in channels]
        return jnp.stack(out).transpose(0, 2, 1)  # dinosaur's nodal layout is [lon, lat]

    lat_deg = np.degrees(out_grid.latitudes)
    lon_deg = np.degrees(out_grid.longitudes)
    return (jax.jit(jax.vmap(init)), jax.jit(jax.vmap(advance)), jax.jit(jax.vmap(fields)),
            tuple(name for _, _, name in channels), lat_deg, lon_deg)


def simulate(config: WeatherDataConfig, *, log=print) -> WeatherData:
    """Simulate ``config.num_trajectories`` trajectories (no cache); see the module docstring."""
    import jax

    with jax.enable_x64(False):
        init, advance, fields, names, lat, lon = _model(config.truncation, config.layers, float(config.dt_minutes),
                                                        config.steps_per_interval, config.lat, config.lon)
        keys = jax.random.split(jax.random.key(config.seed), config.num_trajectories)
        state = init(keys)
        for _ in range(config.spinup_intervals):
            state = advance(state)
        frames = []
        for i in range(config.num_times):
            if i:
                state = advance(state)
            frames.append(np.asarray(fields(state), np.float32))
    out = np.stack(frames, axis=1)  # [trajectory, time, variable, lat, lon]
    if not np.all(np.isfinite(out)):
        raise RuntimeError(f"the Held-Suarez simulation diverged (non-finite fields) with dt_minutes="
                           f"{config.dt_minutes} at T{config.truncation}; choose a smaller time step")
    return WeatherData(np.ascontiguousarray(out), names, lat, lon, config)


# --- metrics and baselines (numpy) --------------------------------------------------------------------------

def lat_weights(lat_deg) -> np.ndarray:
    """cos(latitude) normalised to mean 1 over the latitudes (WeatherBench; Rasp et al. 2020)."""
    w = np.cos(np.radians(np.asarray(lat_deg, np.float64)))
    return w / w.mean()


def zonal_climatology(trajectories: np.ndarray) -> np.ndarray:
    """Mean over trajectories, times and longitudes of [N, T, V, lat, lon] -> [V, lat, lon].

    Held-Suarez forcing is zonally symmetric and constant in time, so its climate is too; the
    zonal mean lowers the sampling noise of a per-gridpoint time mean.
    """
    mean = trajectories.astype(np.float64).mean(axis=(0, 1, 4), keepdims=True)[0, 0]
    return np.broadcast_to(mean, trajectories.shape[2:]).astype(np.float32)


def time_mean_climatology(trajectories: np.ndarray) -> np.ndarray:
    """Mean over trajectories and times of [N, T, V, lat, lon] -> [V, lat, lon], per grid point (float32).

    For real fields, whose climate varies with longitude; it keeps the seasonal and daily cycles
    in the anomalies (WeatherBench 2's climatology is per day of year and hour instead).
    """
    return trajectories.mean(axis=(0, 1), dtype=np.float64).astype(np.float32)


class Normalizer:
    """Per-variable mean and standard deviation of the training trajectories (as ClimaX)."""

    def __init__(self, train: np.ndarray):
        # two passes over pieces of 1024 states in float64: no float64 copy of the training data
        states = train.reshape(-1, *train.shape[2:])  # [N * T, V, lat, lon]
        n = states.shape[0] * states.shape[2] * states.shape[3]
        total = np.zeros(states.shape[1])
        for start in range(0, len(states), 1024):
            total += states[start:start + 1024].sum(axis=(0, 2, 3), dtype=np.float64)
        mean = total / n
        sq = np.zeros(states.shape[1])
        for start in range(0, len(states), 1024):
            piece = states[start:start + 1024].astype(np.float64) - mean[:, None, None]
            sq += np.einsum("tvhw,tvhw->v", piece, piece)
        self.mean, self.std = mean.astype(np.float32), np.sqrt(sq / n).astype(np.float32)
        if np.any(self.std <= 0):
            raise ValueError(f"a variable of the training data is constant (std {self.std})")

    @classmethod
    def of(cls, mean, std) -> "Normalizer":
        """The normalizer of these per-variable statistics (a run's saved ones)."""
        norm = cls.__new__(cls)
        norm.mean, norm.std = np.asarray(mean, np.float32), np.asarray(std, np.float32)
        if norm.mean.ndim != 1 or norm.mean.shape != norm.std.shape or not np.all(norm.std > 0):
            raise ValueError(f"normalization statistics need one mean and one positive std per variable; got "
                             f"shapes {norm.mean.shape} and {norm.std.shape}")
        return norm

    def __call__(self, fields: np.ndarray) -> np.ndarray:
        out = np.subtract(fields, self.mean[:, None, None], dtype=np.float32)  # one new array, float32
        out /= self.std[:, None, None]
        return out


class ForecastBatches:
    """Pairs (state at t, state at t + lead) of normalized trajectories [N, T, V, lat, lon].

    ``batch(step)`` draws ``batch_size`` pairs as a pure function of (seed, step), and with
    ``max_lead_steps`` above ``lead_steps`` each pair's lead uniformly from ``lead_steps`` to
    ``max_lead_steps`` intervals (ClimaX's randomized lead); ``eval_batches`` takes every pair
    at ``lead_steps`` once, in order, padded to whole batches (``valid`` 0). Fields: ``x``, ``y``
    [B, V, lat, lon] and ``lead`` [B] in hours. With ``rollout_steps`` K > 1 (one lead per example)
    ``y_rollout`` [B, K - 1, V, lat, lon] adds the states at 2 .. K leads after ``x``.
    """

    def __init__(self, trajectories: np.ndarray, *, lead_steps: int, interval_hours: int, batch_size: int,
                 seed: int = 0, static: np.ndarray | None = None, max_lead_steps: int = 0, rollout_steps: int = 1):
        n, t = trajectories.shape[:2]
        if rollout_steps > 1 and max(lead_steps, max_lead_steps) != lead_steps:
            raise ValueError(f"rollout_steps={rollout_steps} takes one lead (max_lead_steps={max_lead_steps})")
        longest = max(lead_steps, max_lead_steps) * rollout_steps
        if not 0 < lead_steps < t or longest >= t:
            rolled = f", rollout_steps={rollout_steps}: {longest} intervals" if rollout_steps > 1 else ""
            raise ValueError(f"lead_steps={lead_steps} (up to max_lead_steps={max(lead_steps, max_lead_steps)}"
                             f"{rolled}) must lie in [1, {t - 1}] for trajectories of {t} states")
        self.data, self.lead_steps, self.batch_size, self.seed = trajectories, lead_steps, batch_size, seed
        self.max_lead_steps, self.interval_hours = max(lead_steps, max_lead_steps), interval_hours
        self.rollout_steps = rollout_steps
        self.static = static  # [S, lat, lon] time-invariant inputs, in every batch as ``static`` [B, S, lat, lon]
        self.lead_hours = float(lead_steps * interval_hours)
        self.pairs = np.array([(i, j) for i in range(n) for j in range(t - longest)], np.int64)

    def _gather(self, idx, leads=None) -> dict:
        traj, t = self.pairs[idx, 0], self.pairs[idx, 1]
        leads = np.full(len(idx), self.lead_steps) if leads is None else leads
        out = {"x": self.data[traj, t], "y": self.data[traj, t + leads],
               "lead": (leads * self.interval_hours).astype(np.float32)}
        if self.rollout_steps > 1:
            later = t[:, None] + self.lead_steps * np.arange(2, self.rollout_steps + 1)
            out["y_rollout"] = self.data[traj[:, None], later]
        if self.static is not None:
            out["static"] = np.repeat(self.static[None], len(idx), axis=0)
        return out

    def _draw(self, step: int):
        rng = np.random.default_rng((self.seed, step))
        idx = rng.integers(0, len(self.pairs), self.batch_size)
        if self.max_lead_steps == self.lead_steps:
            return idx, None
        return idx, rng.integers(self.lead_steps, self.max_lead_steps + 1, self.batch_size)

    def batch(self, step: int) -> dict:
        return self._gather(*self._draw(step))

    def batch_rows(self, step: int, start: int, stop: int) -> dict:
        """Rows ``start:stop`` of ``batch(step)``, bit for bit, gathering only those pairs."""
        check_rows(start, stop, self.batch_size)
        idx, leads = self._draw(step)
        return self._gather(idx[start:stop], None if leads is None else leads[start:stop])

    def eval_batches(self, extra: dict | None = None, targets: dict | None = None) -> "EvalBatches":
        """Every pair once, as a sequence of batches each built when it is read (a held-out set's
        batches are never all in memory at once); ``extra`` maps a field name to one array
        broadcast over the batch, ``targets`` to an array per state [N, T, ...] taken at each
        pair's target state."""
        return EvalBatches(self, dict(extra or {}), dict(targets or {}))


class EvalBatches(collections.abc.Sequence):
    """The evaluation batches of a :class:`ForecastBatches`, in order, padded to whole batches
    (``valid`` 0 on the padding rows); ``batches[i]`` builds batch i."""

    def __init__(self, source: ForecastBatches, extra: dict, targets: dict):
        self.source, self.extra, self.targets = source, extra, targets

    def __len__(self) -> int:
        return -(-len(self.source.pairs) // self.source.batch_size)

    def __getitem__(self, i: int) -> dict:
        if not -len(self) <= i < len(self):
            raise IndexError(f"evaluation batch {i} of {len(self)}")
        src, b = self.source, self.source.batch_size
        start = (i % len(self)) * b
        idx = np.arange(start, min(start + b, len(src.pairs)))
        valid = np.ones(b, np.float32)
        if len(idx) < b:
            valid[len(idx):] = 0.0
            idx = np.concatenate([idx, np.full(b - len(idx), idx[-1])])
        batch = {**src._gather(idx), "valid": valid}
        for name, per_state in self.targets.items():
            target = src.pairs[idx, 0], src.pairs[idx, 1] + src.lead_steps
            batch[name] = np.ascontiguousarray(per_state[target])
        for name, value in self.extra.items():
            batch[name] = np.broadcast_to(value, (b, *np.shape(value))).copy()
        return batch


def lat_weighted_mse(pred: np.ndarray, truth: np.ndarray, lat_deg) -> np.ndarray:
    """Mean over samples, latitudes and longitudes of w(lat) (pred - truth)^2, per variable: [..., V, lat, lon] -> [V]."""
    err = (np.asarray(pred, np.float64) - np.asarray(truth, np.float64)) ** 2 * lat_weights(lat_deg)[:, None]
    return err.reshape(-1, *err.shape[-3:]).mean(axis=(0, 2, 3))


def lat_weighted_acc(pred: np.ndarray, truth: np.ndarray, clim: np.ndarray, lat_deg) -> np.ndarray:
    """Anomaly correlation per sample and variable, then the mean over samples: [..., V, lat, lon] -> [V]."""
    w = lat_weights(lat_deg)[:, None]
    fa = (np.asarray(pred, np.float64) - clim).reshape(-1, *np.shape(pred)[-3:])
    ta = (np.asarray(truth, np.float64) - clim).reshape(fa.shape)
    num = (w * fa * ta).sum(axis=(2, 3))
    den = np.sqrt((w * fa * fa).sum(axis=(2, 3)) * (w * ta * ta).sum(axis=(2, 3)))
    return (num / np.maximum(den, 1e-30)).mean(axis=0)
