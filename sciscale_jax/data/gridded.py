"""The user's own gridded atmospheric fields (ERA5, WeatherBench 2, model output), read with xarray.

A store is a Zarr folder (the format of WeatherBench 2 and ARCO-ERA5) or a NetCDF file;
several, comma-separated, are joined along time. Dimensions are found by name, in any order:
time (``time``), latitude (``latitude``, ``lat``), longitude (``longitude``, ``lon``) and, for
3-D variables, the vertical (``level``, ``pressure_level``, ``plev``, ``isobaricInhPa``). A
channel is a variable, or a variable at one level: ``geopotential@500``. Latitudes are turned
to run south to north and longitudes are sorted. Times must be datetimes at one spacing of
whole hours; ``interval_hours`` keeps every k-th state when it is k times that spacing. The
last ``val_fraction`` of the states, or those from ``val_start`` on, are held out, so training
never sees the future of a held-out state. Missing values (NaN) are refused, naming the
channel and the time. Static fields (orography, land-sea mask: variables without a time
dimension) are read beside the channels as inputs.

What a run records of each store (``FieldData.sources``) is the SHA-256 of the values read from
it (the channels, times, latitudes and longitudes), not of the store's files: rechunking or
recompressing a store is no change, a changed value is. Every state read is held in memory
(float32; 40 years of 6-hourly ERA5 at 64 x 32 is about 0.5 GB per channel).
"""

from __future__ import annotations

import dataclasses
import hashlib
import pathlib

import numpy as np

PIECE = 1024  # states read at once per channel
TIME = ("time",)
LAT = ("latitude", "lat")
LON = ("longitude", "lon")
LEVEL = ("level", "pressure_level", "plev", "isobaricInhPa")


@dataclasses.dataclass(frozen=True)
class Channel:
    variable: str
    level: float | None = None

    @property
    def name(self) -> str:
        if self.level is None:
            return self.variable
        return f"{self.variable}@{int(self.level) if float(self.level).is_integer() else self.level}"


def parse_channels(spec: str) -> tuple[Channel, ...]:
    """``"geopotential@500, 2m_temperature"`` -> channels; ValueError in one line for an empty
    list, an empty name, a level that is not a number, or a channel named twice."""
    out = []
    for part in (p.strip() for p in str(spec).split(",")):
        if not part:
            continue
        variable, at, level = part.partition("@")
        variable = variable.strip()
        if not variable:
            raise ValueError(f"channel {part!r} has no variable name")
        if at:
            try:
                value = float(level)
            except ValueError:
                raise ValueError(f"channel {part!r}: the level after '@' must be a number") from None
            out.append(Channel(variable, value))
        else:
            out.append(Channel(variable))
    if not out:
        raise ValueError("no channels given (e.g. geopotential@500,temperature@850,2m_temperature)")
    names = [c.name for c in out]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise ValueError(f"channel {twice[0]} is named twice")
    return tuple(out)


@dataclasses.dataclass(frozen=True)
class FieldData:
    """Training and held-out states [1, time, channel, lat, lon] in the stores' units (float32)."""

    train: np.ndarray
    val: np.ndarray
    variables: tuple         # channel names
    lat: np.ndarray          # degrees, south to north
    lon: np.ndarray          # degrees, ascending
    interval_hours: int      # between consecutive states kept
    times: np.ndarray        # datetime64 of every state kept, training then held out
    sources: dict            # {absolute store path: sha256 of the values read from it}
    units: tuple = ()        # each channel's ``units`` attribute ('' where none)
    static: np.ndarray | None = None  # [S, lat, lon] time-invariant input fields

    @property
    def train_times(self) -> np.ndarray:
        return self.times[:self.train.shape[1]]

    @property
    def val_times(self) -> np.ndarray:
        return self.times[self.train.shape[1]:]

    def summary(self) -> str:
        n_train, n_val = self.train.shape[1], self.val.shape[1]

        def day(t):
            return np.datetime_as_string(t, unit="h")

        return (f"data: {n_train + n_val} states of {len(self.variables)} channel(s) on {len(self.lat)} x "
                f"{len(self.lon)} every {self.interval_hours} h from {len(self.sources)} store(s) of --data: "
                f"{day(self.times[0])} to {day(self.times[n_train - 1])} for training, {day(self.times[n_train])} "
                f"to {day(self.times[-1])} held out")


FIELDS_EXTRA = 'reading gridded fields needs xarray and zarr: pip install -e ".[weather]"'


def _open(path: pathlib.Path, what: str):
    try:
        import xarray as xr
    except ImportError:
        raise ImportError(FIELDS_EXTRA) from None

    if not path.exists():
        raise ValueError(f"{what} {path}: no such file or folder")
    try:
        return xr.open_zarr(path, consolidated=None, chunks=None) if path.is_dir() else xr.open_dataset(path)
    except ImportError as err:
        raise ImportError(f"{FIELDS_EXTRA} ({err})") from None
    except Exception as err:  # xarray, zarr and the NetCDF engines raise many kinds
        why = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        hint = " (reading NetCDF-4 needs netCDF4 or h5netcdf installed)" if path.is_file() else ""
        raise ValueError(f"{what} {path} is not a Zarr store or NetCDF file xarray can read{hint}: {why}") from None


def _dim(dims, names: tuple, what: str, where: str) -> str | None:
    found = [d for d in dims if d in names]
    if len(found) > 1:
        raise ValueError(f"{where} has two {what} dimensions {found}")
    return found[0] if found else None


def _read_static(ds, name: str, lat_dim: str, lon_dim: str, where: str):
    """Time-invariant variable ``name`` [lat, lon] (float32), or None where the store lacks it."""
    if name not in ds.data_vars:
        return None
    da = ds[name]
    for d in da.dims:
        if d not in (lat_dim, lon_dim) and da.sizes[d] != 1:
            raise ValueError(f"{where}: static field {name!r} has dimension {d!r} of size {da.sizes[d]}; a static "
                             "field holds one value per grid point")
    if lat_dim not in da.dims or lon_dim not in da.dims:
        raise ValueError(f"{where}: static field {name!r} has dimensions {da.dims}, not latitude and longitude")
    da = da.squeeze([d for d in da.dims if d not in (lat_dim, lon_dim)], drop=True)
    return np.asarray(da.transpose(lat_dim, lon_dim).values, np.float32)


def _read_store(path: pathlib.Path, channels, what: str, static=()) -> tuple:
    """(times, values [T, V, lat, lon] float32, lat, lon, units, {static name: [lat, lon]}, sha256) of one store."""
    ds = _open(path, what)
    arrays, units = [], []
    time_dim = lat_dim = lon_dim = None
    for ch in channels:
        if ch.variable not in ds.data_vars:
            having = ", ".join(sorted(map(str, ds.data_vars)))
            raise ValueError(f"{what} {path} has no variable {ch.variable!r} (it has {having})")
        da = ds[ch.variable]
        where = f"{what} {path}, variable {ch.variable!r}"
        t, y, x = (_dim(da.dims, names, kind, where) for names, kind in ((TIME, "time"), (LAT, "latitude"),
                                                                           (LON, "longitude")))
        if t is None or y is None or x is None:
            raise ValueError(f"{where} has dimensions {da.dims}; it needs time, latitude and longitude")
        if time_dim is not None and (t, y, x) != (time_dim, lat_dim, lon_dim):
            raise ValueError(f"{where} names its dimensions {(t, y, x)}, other channels {(time_dim, lat_dim, lon_dim)}")
        time_dim, lat_dim, lon_dim = t, y, x
        z = _dim(da.dims, LEVEL, "vertical", where)
        other = [d for d in da.dims if d not in (t, y, x, z)]
        if other:
            raise ValueError(f"{where} has dimension {other[0]!r} (size {da.sizes[other[0]]}) besides time, "
                             "level, latitude and longitude; select one value of it first")
        if z is None and ch.level is not None:
            raise ValueError(f"{where} has no levels, but the channel {ch.name} names one")
        if z is not None:
            levels = np.asarray(da[z].values, np.float64)
            if ch.level is None:
                shown = ", ".join(f"{v:g}" for v in levels[:8]) + (", ..." if len(levels) > 8 else "")
                raise ValueError(f"{where} has levels ({shown}): name one, e.g. {ch.variable}@{levels[0]:g}")
            hit = np.flatnonzero(np.isclose(levels, ch.level))
            if len(hit) != 1:
                raise ValueError(f"{where} has no level {ch.level:g} (it has {', '.join(f'{v:g}' for v in levels)})")
            da = da.isel({z: int(hit[0])})
        arrays.append(da.transpose(t, y, x))  # read below, one channel at a time
        units.append(str(da.attrs.get("units", "")))
    times = np.asarray(ds[time_dim].values)
    if not np.issubdtype(times.dtype, np.datetime64):
        raise ValueError(f"{what} {path}: time is {times.dtype}, not datetimes (a `units: hours since ...` "
                         "attribute lets xarray decode it)")
    lat, lon, orient = _orientation(np.asarray(ds[lat_dim].values, np.float64),
                                    np.asarray(ds[lon_dim].values, np.float64), f"{what} {path}")
    # [T, V, lat, lon] filled piece by piece: the store's values are held once (plus one piece)
    values = np.empty((len(times), len(arrays), len(lat), len(lon)), np.float32)
    for i, da in enumerate(arrays):
        for start in range(0, len(times), PIECE):  # in pieces of time: no copy of a whole channel
            values[start:start + PIECE, i] = orient(np.asarray(da[start:start + PIECE].values, np.float32))
    statics = {}
    for name in static:
        field = _read_static(ds, name, lat_dim, lon_dim, f"{what} {path}")
        if field is not None:
            statics[name] = np.ascontiguousarray(orient(field))
    digest = hashlib.sha256()
    for part in (times.astype("datetime64[s]").astype(np.int64), lat, lon, values, *statics.values()):
        digest.update(memoryview(np.ascontiguousarray(part)).cast("B"))  # no copy of the values
    return times.astype("datetime64[s]"), values, lat, lon, tuple(units), statics, digest.hexdigest()


def _orientation(lat, lon, where: str):
    """(south-to-north latitudes, ascending longitudes, the function turning [..., lat, lon] arrays
    so); ValueError for latitudes that are not monotonic or repeated longitudes."""
    flip = len(lat) > 1 and bool(np.all(np.diff(lat) < 0))
    if flip:
        lat = lat[::-1]
    if not np.all(np.diff(lat) > 0):
        raise ValueError(f"{where}: latitudes are not strictly monotonic")
    order = np.argsort(lon, kind="stable")
    lon = lon[order]
    if not np.all(np.diff(lon) > 0):
        raise ValueError(f"{where}: longitudes repeat")
    sorted_already = bool(np.all(order == np.arange(len(order))))

    def orient(a):
        a = a[..., ::-1, :] if flip else a
        return a if sorted_already else a[..., order]

    return lat, lon, orient


def _hours(delta) -> float:
    return float(delta / np.timedelta64(1, "s")) / 3600.0


@dataclasses.dataclass(frozen=True)
class Series:
    """Every state kept of the stores: ``values`` [time, channel, lat, lon] (float32)."""

    times: np.ndarray
    values: np.ndarray
    lat: np.ndarray
    lon: np.ndarray
    interval_hours: int
    sources: dict
    units: tuple
    static: np.ndarray | None = None  # [S, lat, lon] time-invariant fields, as named


def read_series(spec: str, channels, *, interval_hours: int | None = 6, static=(), what: str = "--data") -> Series:
    """The channels of the stores ``spec`` names (comma-separated Zarr folders or NetCDF files),
    joined in time, every ``interval_hours`` (None: every state); ValueError in one line for anything that cannot be
    read as the module docstring says (naming the stores as ``what``). ``static``: names of
    time-invariant fields (no time dimension, or one of size 1), each in at least one store and the
    same wherever it is."""
    channels = parse_channels(channels) if isinstance(channels, str) else tuple(channels)
    paths = [pathlib.Path(p.strip()).expanduser() for p in str(spec).split(",") if p.strip()]
    if not paths:
        raise ValueError(f"{what}: no store given")
    static = tuple(static)
    twice = sorted(set(static) & {c.variable for c in channels} | {n for n in static if static.count(n) > 1})
    if twice:
        raise ValueError(f"{twice[0]!r} is named twice among the channels and static fields")
    parts, sources, grid, units, found = [], {}, None, (), {}
    for path in paths:
        times, values, lat, lon, units, statics, digest = _read_store(path, channels, what, static)
        for name, field in statics.items():
            if name in found and not np.array_equal(found[name], field):
                raise ValueError(f"{what}: static field {name!r} differs between the stores")
            found[name] = field
        if grid is not None and (grid[0].shape != lat.shape or grid[1].shape != lon.shape
                                 or not np.allclose(grid[0], lat) or not np.allclose(grid[1], lon)):
            raise ValueError(f"{what} {path} is on another grid than {paths[0]}")
        grid = (lat, lon)
        parts.append((times, values))
        sources[str(path.resolve())] = digest
    parts.sort(key=lambda p: p[0][0] if len(p[0]) else np.datetime64("NaT"))
    times = np.concatenate([p[0] for p in parts])
    values = np.concatenate([p[1] for p in parts]) if len(parts) > 1 else parts[0][1]
    if len(times) < 2:
        raise ValueError(f"{what} holds {len(times)} state(s); forecasting needs a series of them")
    step = np.diff(times)
    if np.any(step <= np.timedelta64(0, "s")):
        i = int(np.flatnonzero(step <= np.timedelta64(0, "s"))[0])
        raise ValueError(f"{what}: time {np.datetime_as_string(times[i + 1])} does not come after "
                         f"{np.datetime_as_string(times[i])} (times repeat or the stores overlap)")
    spacing = _hours(step[0])
    if spacing != int(spacing) or spacing < 1:
        raise ValueError(f"{what}: states are {spacing:g} h apart; weather-vit needs a whole number of hours")
    gaps = np.flatnonzero(step != step[0])
    if len(gaps):
        i = int(gaps[0])
        raise ValueError(f"{what}: the states are not evenly spaced: {np.datetime_as_string(times[i + 1])} follows "
                         f"{np.datetime_as_string(times[i])} after {_hours(step[i]):g} h where the spacing is "
                         f"{spacing:g} h")
    spacing = int(spacing)
    interval_hours = spacing if interval_hours is None else interval_hours
    if interval_hours % spacing:
        raise ValueError(f"interval_hours={interval_hours} is not a multiple of the data's {spacing} h spacing "
                         f"(pass --interval-hours {spacing} or a multiple of it)")
    stride = interval_hours // spacing
    times, values = times[::stride], values[::stride]
    for start in range(0, len(values), PIECE):  # in pieces: no mask the size of the data
        bad = ~np.isfinite(values[start:start + PIECE]).all(axis=(2, 3))
        if bad.any():
            t, v = (int(i) for i in np.argwhere(bad)[0])
            raise ValueError(f"{what}: channel {channels[v].name} has missing values (NaN) at "
                             f"{np.datetime_as_string(times[start + t])}; fill or mask them before training")
    missing = [n for n in static if n not in found]
    if missing:
        raise ValueError(f"{what}: no store holds the static field {missing[0]!r}")
    for name in static:
        if not np.all(np.isfinite(found[name])):
            raise ValueError(f"{what}: static field {name!r} has missing values (NaN); fill them before training")
    lat, lon = grid
    return Series(times, values, lat, lon, interval_hours, sources, units,
                  np.stack([found[n] for n in static]) if static else None)


def parse_date(text: str, name: str) -> np.datetime64:
    """``text`` (``2018-01-01``, ``2018-01-01T06``) as a datetime64 in seconds; ValueError in one
    line naming the setting ``name`` otherwise."""
    try:
        return np.datetime64(text, "s")
    except ValueError:
        raise ValueError(f"{name}={text!r} is not a date (e.g. 2018-01-01)") from None


def read_fields(spec: str, channels, *, interval_hours: int = 6, val_fraction: float = 0.1, val_start: str = "",
                min_states: int = 2, static=()) -> FieldData:
    """:func:`read_series`, split in time: the last ``val_fraction`` of the states, or those from
    ``val_start`` on, held out. ``min_states``: the fewest states each side needs."""
    channels = parse_channels(channels) if isinstance(channels, str) else tuple(channels)
    series = read_series(spec, channels, interval_hours=interval_hours, static=static)
    times, values = series.times, series.values
    if val_start:
        n_train = int(np.searchsorted(times, parse_date(val_start, "val_start")))
    else:
        n_train = len(times) - max(1, int(round(val_fraction * len(times))))
    n_val = len(times) - n_train
    if min(n_train, n_val) < min_states:
        raise ValueError(f"--data: {n_train} training and {n_val} held-out states of {interval_hours} h from "
                         f"{np.datetime_as_string(times[0])} to {np.datetime_as_string(times[-1])}; each side "
                         f"needs at least {min_states}")
    return FieldData(train=values[None, :n_train], val=values[None, n_train:],
                     variables=tuple(c.name for c in channels), lat=series.lat, lon=series.lon,
                     interval_hours=interval_hours, times=times, sources=series.sources, units=series.units,
                     static=series.static)


def day_of_year(times) -> np.ndarray:
    """0-based day of the year (0..365) of datetime64 values."""
    times = np.asarray(times)
    return (times.astype("datetime64[D]") - times.astype("datetime64[Y]")).astype(np.int64)


def hour_of_day(times) -> np.ndarray:
    times = np.asarray(times)
    return ((times - times.astype("datetime64[D]")) // np.timedelta64(1, "h")).astype(np.int64)


def seasonal_climatology(values, times, at, *, window_days: int = 30) -> np.ndarray:
    """The climatology of each time in ``at`` from states ``values`` [T, V, lat, lon] at ``times``:
    the mean of the states at the same hour of the day whose day of the year lies within
    ``window_days`` of its day (on a 366-day circle), as WeatherBench 2's per-day-of-year, per-hour
    climatology smoothed over a 61-day window; float32 [len(at), V, lat, lon]. A time whose window
    holds no state (its hour never recorded) gets the mean of all states."""
    values = np.asarray(values)
    days, hours = day_of_year(times), hour_of_day(times)
    at_days, at_hours = day_of_year(at), hour_of_day(at)
    w = int(window_days)
    if not 0 <= w < 183:
        raise ValueError(f"window_days={window_days} must lie in [0, 182]")
    out = np.empty((len(at), *values.shape[1:]), np.float32)
    overall = values.mean(axis=0, dtype=np.float64)
    for hour in np.unique(at_hours):
        sums = np.zeros((366, *values.shape[1:]), np.float64)
        counts = np.zeros(366, np.int64)
        pick = hours == hour
        for day in np.unique(days[pick]):  # day by day: no float64 copy of the states
            sums[day] = values[pick & (days == day)].sum(axis=0, dtype=np.float64)
        np.add.at(counts, days[pick], 1)
        # window sums on the circle: cumulative sums over the days padded by w on each side
        ring = np.concatenate([sums[366 - w:], sums, sums[:w]]) if w else sums
        ring_counts = np.concatenate([counts[366 - w:], counts, counts[:w]]) if w else counts
        csum = np.concatenate([np.zeros((1, *sums.shape[1:])), np.cumsum(ring, axis=0)])
        ccount = np.concatenate([[0], np.cumsum(ring_counts)])
        shape = (-1, *([1] * (values.ndim - 1)))
        n = (ccount[2 * w + 1:] - ccount[:-2 * w - 1]).reshape(shape)  # [366, 1, ...] states in each window
        with np.errstate(invalid="ignore", divide="ignore"):
            table = np.where(n > 0, (csum[2 * w + 1:] - csum[:-2 * w - 1]) / n, overall)  # [366, ...]
        rows = np.flatnonzero(at_hours == hour)
        for day in np.unique(at_days[rows]):  # assigned day by day: no temporary the size of ``at``
            out[rows[at_days[rows] == day]] = table[day]
    return out
