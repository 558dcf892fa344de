"""weather-vit on the user's own gridded fields (Zarr / NetCDF through xarray): the reader picks,
orients, thins and splits exactly the values written; bad stores are refused in one line; a run
records what it read and refuses to resume or evaluate on changed values; ``sciscale embed``
writes the trained model's forecasts."""

import dataclasses
import json
import math
import shutil
import warnings

import numpy as np
import pytest

from sciscale_jax import cli
from sciscale_jax.data import gridded
from sciscale_jax.recipes import load_run, weather_vit

xr = pytest.importorskip("xarray", reason='gridded fields need xarray: pip install -e ".[weather]"')
pytest.importorskip("zarr", reason='Zarr stores need zarr: pip install -e ".[weather]"')
pd = pytest.importorskip("pandas")

LAT = -90.0 + (np.arange(8) + 0.5) * 22.5   # equiangular cell centres, south to north
LON = np.arange(16) * 22.5
LEVELS = [250, 500, 850]


def _fields(times=24, hours=3, seed=0):
    """Smooth random fields: geopotential [T, level, lat, lon] and 2m temperature [T, lat, lon], float32."""
    rng = np.random.default_rng(seed)
    t = np.arange(times)[:, None, None]
    base = np.sin(np.radians(LAT))[None, :, None] + np.cos(np.radians(LON))[None, None, :]
    z = np.stack([5e4 + 1e3 * k + 300 * np.sin(0.3 * t + k) * base + rng.normal(0, 30, (times, 8, 16))
                  for k in range(3)], axis=1).astype(np.float32)
    t2 = (280 + 10 * base + 2 * np.cos(0.2 * t) + rng.normal(0, 0.5, (times, 8, 16))).astype(np.float32)
    return pd.date_range("2020-01-01", periods=times, freq=f"{hours}h"), z, t2


def _dataset(times, z, t2):
    """Latitudes north to south (as ERA5), the longitudes 0..337.5 relabelled -180..180 but left in
    their order (0, 22.5, ..., 157.5, -180, ..., -22.5: the reader must sort them), the level
    between lat and lon."""
    lon = (LON + 180) % 360 - 180
    zz = z.transpose(0, 2, 1, 3)[:, ::-1]        # [T, lat (N->S), level, lon]
    tt = t2[:, ::-1]
    ds = xr.Dataset({"geopotential": (("time", "latitude", "pressure_level", "longitude"), zz, {"units": "m2/s2"}),
                     "2m_temperature": (("time", "latitude", "longitude"), tt, {"units": "K"})},
                    coords={"time": times, "pressure_level": LEVELS, "latitude": LAT[::-1], "longitude": lon})
    return ds


def _write(ds, path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # zarr's note on consolidated metadata in format 3
        if str(path).endswith(".nc"):
            ds.to_netcdf(path)
        else:
            ds.to_zarr(path, mode="w")
    return path


def _lon_sorted(a):
    """The source's longitudes as the reader returns them: ascending from -180."""
    return a[..., np.argsort((LON + 180) % 360 - 180)]


def test_reader_picks_orients_thins_and_splits_the_values_written(tmp_path):
    times, z, t2 = _fields(times=24, hours=3)
    store = _write(_dataset(times, z, t2), tmp_path / "era.zarr")
    f = gridded.read_fields(str(store), "2m_temperature, geopotential@500", interval_hours=6, val_fraction=0.25)
    # every second 3-hourly state; 12 states, the last 3 held out
    want = np.stack([t2, z[:, 1]], axis=1)[::2]
    np.testing.assert_array_equal(np.concatenate([f.train[0], f.val[0]]), _lon_sorted(want))
    assert f.train.shape == (1, 9, 2, 8, 16) and f.val.shape == (1, 3, 2, 8, 16)
    np.testing.assert_array_equal(f.lat, LAT)
    assert np.all(np.diff(f.lon) > 0) and f.lon[0] == -180.0
    assert f.variables == ("2m_temperature", "geopotential@500") and f.units == ("K", "m2/s2")
    assert f.interval_hours == 6 and str(f.times[9]) == "2020-01-03T06:00:00"
    assert "12 states of 2 channel(s) on 8 x 16 every 6 h" in f.summary()
    assert "2020-01-01T00 to 2020-01-03T00 for training, 2020-01-03T06 to 2020-01-03T18 held out" in f.summary()
    g = gridded.read_fields(str(store), "geopotential@850", interval_hours=3, val_start="2020-01-03T12")
    np.testing.assert_array_equal(g.train[0, :, 0], _lon_sorted(z[:20, 2]))  # 2020-01-03T12 is state 20
    np.testing.assert_array_equal(g.val[0, :, 0], _lon_sorted(z[20:, 2]))


def test_zarr_netcdf_and_stores_joined_in_time_read_alike(tmp_path):
    times, z, t2 = _fields(times=16, hours=6)
    ds = _dataset(times, z, t2)
    zarr_store = _write(ds, tmp_path / "all.zarr")
    nc = _write(ds, tmp_path / "all.nc")  # NetCDF-3 through scipy where netCDF4 is absent
    late = _write(ds.isel(time=slice(8, None)), tmp_path / "late.zarr")   # given first: joined by time
    early = _write(ds.isel(time=slice(0, 8)), tmp_path / "early.nc")
    channels = "geopotential@250,2m_temperature"
    read = [gridded.read_fields(spec, channels, interval_hours=6, val_fraction=0.25)
            for spec in (str(zarr_store), str(nc), f"{late},{early}")]
    for other in read[1:]:
        np.testing.assert_array_equal(other.train, read[0].train)
        np.testing.assert_array_equal(other.val, read[0].val)
        np.testing.assert_array_equal(other.times, read[0].times)
    # the fingerprint is of the values read, not of the files: the same for Zarr and NetCDF, and
    # for the store rechunked, different once one value changes
    assert list(read[0].sources.values()) == list(read[1].sources.values())
    assert set(read[2].sources) == {str(late.resolve()), str(early.resolve())}
    rechunked = _write(ds.chunk({"time": 3}), tmp_path / "rechunked.zarr")
    assert list(gridded.read_fields(str(rechunked), channels).sources.values()) == list(read[0].sources.values())
    changed = ds.copy(deep=True)
    changed["2m_temperature"][5, 3, 7] += 0.01
    assert (list(gridded.read_fields(str(_write(changed, tmp_path / "changed.zarr")), channels).sources.values())
            != list(read[0].sources.values()))


def _broken(tmp_path, kind):
    times, z, t2 = _fields(times=12, hours=6)
    ds = _dataset(times, z, t2)
    if kind == "nan":
        ds["2m_temperature"][7, 2, 3] = np.nan
    elif kind == "gap":
        ds = ds.isel(time=[0, 1, 2, 4, 5, 6, 7, 8, 9, 10, 11])
    elif kind == "repeat":
        ds = ds.isel(time=[0, 1, 2, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11])
    elif kind == "numbers":
        ds = ds.assign_coords(time=np.arange(12.0))
    elif kind == "member":
        ds = xr.concat([ds, ds], dim="member")
    elif kind == "12h":
        ds = ds.isel(time=slice(0, None, 2))
    elif kind == "poles":
        ds = ds.assign_coords(latitude=np.linspace(90, -90, 8))
    return str(_write(ds, tmp_path / f"{kind}.zarr"))


@pytest.mark.parametrize("kind, channels, match", [
    ("nan", "2m_temperature", r"channel 2m_temperature has missing values \(NaN\) at 2020-01-02T18:00:00; fill"),
    ("gap", "2m_temperature", "not evenly spaced: 2020-01-02T00:00:00 follows 2020-01-01T12:00:00 after 12 h "
                              "where the spacing is 6 h"),
    ("repeat", "2m_temperature", "time 2020-01-01T12:00:00 does not come after 2020-01-01T12:00:00"),
    ("numbers", "2m_temperature", "time is float64, not datetimes"),
    ("member", "2m_temperature", r"has dimension 'member' \(size 2\) besides time, level, latitude and longitude"),
    ("12h", "2m_temperature", r"interval_hours=6 is not a multiple of the data's 12 h spacing \(pass "
                              "--interval-hours 12"),
    ("ok", "temperature@850", r"has no variable 'temperature' \(it has 2m_temperature, geopotential\)"),
    ("ok", "geopotential", r"has levels \(250, 500, 850\): name one, e.g. geopotential@250"),
    ("ok", "geopotential@700", r"has no level 700 \(it has 250, 500, 850\)"),
    ("ok", "2m_temperature@2", "has no levels, but the channel 2m_temperature@2 names one"),
    ("ok", "2m_temperature,2m_temperature", "channel 2m_temperature is named twice"),
    ("ok", "geopotential@high", "the level after '@' must be a number"),
])
def test_bad_stores_are_refused_in_one_line(tmp_path, kind, channels, match):
    with pytest.raises(ValueError, match=match) as err:
        gridded.read_fields(_broken(tmp_path, kind), channels)
    assert "\n" not in str(err.value)


def test_missing_or_unreadable_stores_and_short_series_are_refused(tmp_path):
    (tmp_path / "notes.txt").write_text("not a store")
    (tmp_path / "empty").mkdir()
    for spec, match in ((str(tmp_path / "absent.zarr"), "absent.zarr: no such file or folder"),
                        (str(tmp_path / "notes.txt"), "notes.txt is not a Zarr store or NetCDF file xarray can read"),
                        (str(tmp_path / "empty"), "empty is not a Zarr store or NetCDF file xarray can read")):
        with pytest.raises(ValueError, match=match) as err:
            gridded.read_fields(spec, "2m_temperature")
        assert "\n" not in str(err.value)
    store = _broken(tmp_path, "ok")
    with pytest.raises(ValueError, match="2 training and 10 held-out states .* each side needs at least 3"):
        gridded.read_fields(store, "2m_temperature", val_start="2020-01-01T12", min_states=3)
    with pytest.raises(ValueError, match="val_start='soon' is not a date"):
        gridded.read_fields(store, "2m_temperature", val_start="soon")


# --- the recipe -------------------------------------------------------------------------------------------------

MODEL = ["--lat", "8", "--lon", "16", "--patch-size", "4", "--layers", "2", "--heads", "2", "--embed-dim", "16",
         "--mlp-dim", "32", "--batch-size", "4", "--warmup-steps", "1", "--no-progress"]


def test_config_refusals():
    make = weather_vit.RECIPE.make_config
    with pytest.raises(ValueError, match="--data needs --channels"):
        make(data="x.zarr")
    with pytest.raises(ValueError, match="--channels, --static and --val-start choose from your --data"):
        make(channels="2m_temperature")
    with pytest.raises(ValueError, match="num_vars=3 must equal the 2 channels"):
        make(data="x.zarr", channels="a,b", num_vars=3)
    with pytest.raises(ValueError, match="val_fraction=1.0 must lie strictly between 0 and 1"):
        make(data="x.zarr", channels="a", val_fraction=1.0)
    with pytest.raises(ValueError, match="val_start='May' is not a date"):
        make(data="x.zarr", channels="a", val_start="May")
    assert make(data="x.zarr", channels="a@500,b").num_vars == 2
    assert make().num_vars == 8  # the simulation's channels
    assert make(data="x.zarr", channels="a", lon=8).lon == 8  # the simulation's grid limits do not apply


def test_recipe_refuses_a_grid_it_cannot_weight(tmp_path):
    store = _broken(tmp_path, "poles")
    with pytest.raises(ValueError, match=r"latitudes \(-90 to 90\) are not the equiangular cell centres"):
        cli.main(["train", "weather-vit", "--data", store, "--channels", "2m_temperature", "--val-fraction", "0.25",
                  "--out", str(tmp_path / "run"), "--steps", "1", *MODEL, "--debug"])
    with pytest.raises(ValueError, match=r"on \(8, 16\) but the model expects .* \(pass --lat 8 --lon 16\)"):
        cli.main(["train", "weather-vit", "--data", _broken(tmp_path, "ok"), "--channels", "2m_temperature",
                  "--val-fraction", "0.25", "--out", str(tmp_path / "run2"), "--steps", "1", *MODEL[4:], "--debug"])
    assert not (tmp_path / "run").exists() and not (tmp_path / "run2").exists()


def _rmse_plain(x, y):
    """sqrt of the mean over pairs of the cos(lat)-weighted mean squared difference, by loops over pairs."""
    w = np.cos(np.radians(LAT))
    w = w / w.mean()
    total = 0.0
    for a, b in zip(x, y):
        total += float(np.mean(w[:, None] * (a.astype(np.float64) - b) ** 2))
    return math.sqrt(total / len(x))


def test_cli_trains_on_a_store_records_it_and_forecasts(tmp_path, capsys):
    times, z, t2 = _fields(times=24, hours=6)
    lsm = (np.random.default_rng(9).random((8, 16)) > 0.6).astype(np.float32)  # a land-sea mask, south to north
    ds = _dataset(times, z, t2).assign(land_sea_mask=(("latitude", "longitude"), lsm[::-1]))
    store = _write(ds, tmp_path / "era.zarr")
    run = tmp_path / "run"
    argv = ["train", "weather-vit", "--data", str(store), "--channels", "geopotential@500,2m_temperature",
            "--static", "land_sea_mask", "--val-fraction", "0.25", "--out", str(run), "--steps", "2",
            "--eval-every", "100", *MODEL]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert ("data: 24 states of 2 channel(s) on 8 x 16 every 6 h from 1 store(s) of --data: 2020-01-01T00 to "
            "2020-01-05T06 for training, 2020-01-05T12 to 2020-01-06T18 held out; climatology: time mean of the "
            "training states per grid point (they span less than a year); static fields: land_sea_mask") in out
    # the persistence baseline in physical units on the 5 held-out pairs, written plainly
    val = _lon_sorted(np.stack([z[:, 1], t2], axis=1)[18:])
    for i, name in enumerate(("geopotential@500", "2m_temperature")):
        shown = float(out.split(f"baseline persistence_rmse_{name}: ")[1].split()[0])
        assert shown == pytest.approx(_rmse_plain(val[:-1, i], val[1:, i]), rel=1e-3)
    saved = json.loads((run / "run_config.json").read_text())
    assert list(saved["data_files"]) == [str(store.resolve())]
    with np.load(run / "data_stats.npz") as stats:  # what forecasts need of the training data, saved with the run
        assert sorted(stats.files) == ["interval_hours", "mean", "static_norm", "std"]
        assert stats["static_norm"].shape == (1, 8, 16) and int(stats["interval_hours"]) == 6

    # forecasts of every state of a store: the loaded model on the inputs normalized by the
    # training states' mean and standard deviation (the mask by its own), back in physical units
    nc = _write(ds.isel(time=slice(0, 6)), tmp_path / "six.nc")
    target = tmp_path / "forecast.npz"
    assert cli.main(["embed", str(run), "--input", str(nc), "--out", str(target), "--batch-size", "4"]) == 0
    got = np.load(target)
    assert got["forecast"].shape == (1, 6, 2, 8, 16) and got["lead_hours"].tolist() == [6]
    assert str(got["valid_time"][0, 0]) == "2020-01-01T06:00:00" and list(got["variables"]) == [
        "geopotential@500", "2m_temperature"]
    train = _lon_sorted(np.stack([z[:, 1], t2], axis=1)[:18]).astype(np.float64)
    mean, std = train.mean(axis=(0, 2, 3))[:, None, None], train.std(axis=(0, 2, 3))[:, None, None]
    loaded = load_run(run, log=lambda *_: None)
    model = loaded.model
    np.testing.assert_allclose(loaded.data_stats()["mean"], mean[:, 0, 0], rtol=1e-6)  # saved: the training states'
    np.testing.assert_allclose(loaded.data_stats()["std"], std[:, 0, 0], rtol=1e-5)
    x = ((_lon_sorted(np.stack([z[:6, 1], t2[:6]], axis=1)) - mean) / std).astype(np.float32)
    mask = _lon_sorted(lsm)[None].astype(np.float64)
    mask = ((mask - mask.mean()) / mask.std()).astype(np.float32)
    want = np.asarray(model(x, np.full(6, 6.0, np.float32), mask)) * std + mean
    np.testing.assert_allclose(got["forecast"][0], want, rtol=1e-5, atol=1e-3 * std.max())
    # the same forecasts as a NetCDF dataset in WeatherBench 2's layout
    assert cli.main(["embed", str(run), "--input", str(nc), "--out", str(tmp_path / "fc.nc"), "--batch-size", "4"]) == 0
    with xr.open_dataset(tmp_path / "fc.nc") as fc:
        assert fc["geopotential"].dims == ("time", "prediction_timedelta", "level", "latitude", "longitude")
        assert fc["2m_temperature"].dims == ("time", "prediction_timedelta", "latitude", "longitude")
        assert fc["level"].values.tolist() == [500] and fc["prediction_timedelta"].values.tolist() == [6 * 3600 * 10**9]
        np.testing.assert_array_equal(fc["geopotential"].values[:, 0, 0], got["forecast"][0, :, 0])
        np.testing.assert_array_equal(fc["2m_temperature"].values[:, 0], got["forecast"][0, :, 1])
        np.testing.assert_array_equal(fc["time"].values, times[:6].values)
    capsys.readouterr()
    assert cli.main(["embed", str(run), "--input", str(nc), "--out", str(tmp_path / "fc.nc")]) == 2
    assert "fc.nc exists; remove it or name another" in capsys.readouterr().err

    # one value changed in the store: resuming and evaluating are refused, nothing is overwritten
    changed = ds.copy(deep=True)
    changed["2m_temperature"][3, 2, 2] += 0.5
    _write(changed, tmp_path / "changed.zarr")
    shutil.rmtree(store)
    shutil.copytree(tmp_path / "changed.zarr", store)
    before = (run / "run_config.json").read_text()
    assert cli.main([*argv[:-len(MODEL) - 4], "--steps", "3", "--eval-every", "100", *MODEL, "--resume"]) == 2
    assert "data_files" in capsys.readouterr().err
    assert cli.main(["eval", str(run)]) == 2
    assert "trained on other data: " + str(store.resolve()) + " changed" in capsys.readouterr().err
    # forecasts are normalized by the training data's statistics as the run saved them
    # (data_stats.npz): the store is not read again, so its change does not matter
    assert cli.main(["embed", str(run), "--input", str(nc), "--out", str(tmp_path / "saved.npz"),
                     "--batch-size", "4"]) == 0
    np.testing.assert_array_equal(np.load(tmp_path / "saved.npz")["forecast"], got["forecast"])
    # a run saved without them (an earlier version) reads the training data again: refused, nothing written
    stats = (run / "data_stats.npz").read_bytes()
    (run / "data_stats.npz").unlink()
    assert cli.main(["embed", str(run), "--input", str(nc), "--out", str(tmp_path / "stale.npz")]) == 2
    err = capsys.readouterr().err
    assert "training data changed since it trained" in err and str(store.resolve()) in err, err
    assert not (tmp_path / "stale.npz").exists()
    (run / "data_stats.npz").write_bytes(b"PK\x03\x04 not a zip")  # damaged: one line naming it
    assert cli.main(["embed", str(run), "--input", str(nc), "--out", str(tmp_path / "stale.npz")]) == 2
    err = capsys.readouterr().err.strip()
    assert "data_stats.npz is unreadable" in err and "\n" not in err and not (tmp_path / "stale.npz").exists()
    (run / "data_stats.npz").write_bytes(stats)
    assert (run / "run_config.json").read_text() == before and not (run / "checkpoints" / "3").exists()
    shutil.rmtree(store)
    _write(ds, store)
    assert cli.main([*argv[:-len(MODEL) - 4], "--steps", "3", "--eval-every", "100", *MODEL, "--resume"]) == 0
    assert (run / "checkpoints" / "3").exists()


# --- climatology of the user's fields ----------------------------------------------------------------------------

def _plain_seasonal(values, times, target, window):
    """Mean of the states at the target's hour whose day of the year is within ``window`` days on a 366-day circle."""
    t = pd.Timestamp(target).to_pydatetime()
    picked = []
    for v, s in zip(values, pd.DatetimeIndex(times).to_pydatetime()):
        gap = abs(s.timetuple().tm_yday - t.timetuple().tm_yday)
        if s.hour == t.hour and min(gap, 366 - gap) <= window:
            picked.append(v.astype(np.float64))
    return np.mean(picked, axis=0) if picked else values.astype(np.float64).mean(axis=0)


def test_seasonal_climatology_is_the_windowed_mean_per_day_of_year_and_hour():
    rng = np.random.default_rng(3)
    times = np.asarray(pd.date_range("2019-01-01", "2021-06-30 12:00", freq="12h"), "datetime64[s]")
    values = rng.normal(size=(len(times), 2, 2, 3)).astype(np.float32) + np.arange(len(times))[:, None, None, None]
    at = np.asarray(pd.to_datetime(["2021-12-31 00:00", "2022-01-01 12:00", "2020-02-29 00:00", "2021-07-15 12:00",
                                    "2021-07-15 06:00"]), "datetime64[s]")  # the last: an hour never recorded
    for window in (0, 3, 30):
        got = gridded.seasonal_climatology(values, times, at, window_days=window)
        for row, target in enumerate(at):
            np.testing.assert_allclose(got[row], _plain_seasonal(values, times, target, window), rtol=1e-6,
                                       err_msg=f"{target} window {window}")


def test_a_year_of_training_states_gets_the_seasonal_climatology(tmp_path):
    times = pd.date_range("2018-01-01", periods=900, freq="D")
    days = np.arange(900)[:, None, None]
    season = np.cos(2 * np.pi * days / 365.25) * np.sin(np.radians(LAT))[None, :, None]
    t2 = (280 + 15 * season + np.random.default_rng(5).normal(0, 1, (900, 8, 16))).astype(np.float32)
    ds = xr.Dataset({"t2m": (("time", "lat", "lon"), t2)}, coords={"time": times, "lat": LAT, "lon": LON})
    store = _write(ds, tmp_path / "daily.zarr")
    recipe, model_cfg, train_cfg = cli.build_configs(["weather-vit", "--data", str(store), "--channels", "t2m",
                                                      "--interval-hours", "24", "--val-start", "2020-01-01",
                                                      *MODEL])
    data = recipe.build_data(train_cfg, model_cfg)
    assert "climatology: per day of year and hour of the training states (61-day window)" in data.summary
    prep = data.train.prepared
    n_train = 730  # 2018 and 2019
    want = np.stack([_plain_seasonal(t2[:n_train], times[:n_train], times[n_train + j], 30)
                     for j in range(900 - n_train)])
    np.testing.assert_allclose(prep.clim[0, :, 0], want, rtol=1e-6)
    # the evaluation batches carry each pair's target-state climatology, normalized
    mean, std = t2[:n_train].astype(np.float64).mean(), t2[:n_train].astype(np.float64).std()
    first = data.eval[0]
    for row in range(4):
        np.testing.assert_allclose(first["clim"][row, 0], (want[row + 1] - mean) / std, rtol=1e-4, atol=1e-4)
    # the climatology baseline beats persistence on a seasonal signal under daily noise, as on real fields
    assert data.baselines["climatology_rmse_t2m"] < data.baselines["persistence_rmse_t2m"]
    val = t2[n_train:].astype(np.float64)
    assert data.baselines["climatology_rmse_t2m"] == pytest.approx(_rmse_plain(want[1:], val[1:]), rel=1e-4)


# --- static fields ----------------------------------------------------------------------------------------------

def test_static_fields_are_read_oriented_and_checked(tmp_path):
    times, z, t2 = _fields(times=12, hours=6)
    rng = np.random.default_rng(4)
    orog, lsm = rng.normal(size=(8, 16)).astype(np.float32), (rng.random((8, 16)) > 0.5).astype(np.float32)
    ds = _dataset(times, z, t2)
    as_stored = {"geopotential_at_surface": (("latitude", "longitude"), orog[::-1]),
                 "land_sea_mask": (("time1", "longitude", "latitude"), lsm[::-1].T[None])}
    store = _write(ds.assign(as_stored), tmp_path / "s.zarr")
    f = gridded.read_fields(str(store), "2m_temperature", val_fraction=0.25,
                            static=("land_sea_mask", "geopotential_at_surface"))
    np.testing.assert_array_equal(f.static, np.stack([_lon_sorted(lsm), _lon_sorted(orog)]))
    # one of two stores holding it is enough; two that disagree are refused
    early, late = (_write(ds.isel(time=slice(a, b)), tmp_path / n) for a, b, n in ((0, 6, "a.zarr"), (6, 12, "b.zarr")))
    with_mask = _write(ds.isel(time=slice(6, 12)).assign(land_sea_mask=as_stored["land_sea_mask"]),
                       tmp_path / "c.zarr")
    joined = gridded.read_fields(f"{early},{with_mask}", "2m_temperature", val_fraction=0.25,
                                 static=("land_sea_mask",))
    np.testing.assert_array_equal(joined.static[0], _lon_sorted(lsm))
    flipped = _write(ds.isel(time=slice(0, 6)).assign(
        land_sea_mask=(("latitude", "longitude"), 1 - lsm[::-1])), tmp_path / "d.zarr")
    for spec, static, match in (
            (f"{early},{late}", ("land_sea_mask",), "no store holds the static field 'land_sea_mask'"),
            (f"{flipped},{with_mask}", ("land_sea_mask",), "static field 'land_sea_mask' differs between the stores"),
            (str(store), ("2m_temperature",), "'2m_temperature' is named twice among the channels and static"),
            (str(store), ("geopotential",), r"static field 'geopotential' has dimension 'time' of size 12")):
        with pytest.raises(ValueError, match=match):
            gridded.read_fields(spec, "2m_temperature", val_fraction=0.25, static=static)
    with pytest.raises(ValueError, match="--channels, --static and --val-start choose from your --data"):
        weather_vit.RECIPE.make_config(static="land_sea_mask")
    assert weather_vit.RECIPE.make_config(data="x", channels="a", static="b, c").num_static == 2


def test_the_model_takes_static_fields_as_inputs_only():
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from sciscale_jax.models.climax import ClimaX, ClimaXConfig

    cfg = ClimaXConfig(num_vars=2, num_static=2, lat=4, lon=8, patch_size=2, num_layers=1, num_heads=2,
                       embed_dim=8, mlp_dim=16)
    model = ClimaX(cfg, rngs=nnx.Rngs(0))
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.normal(size=(3, 2, 4, 8)), jnp.float32)
    lead = jnp.full((3,), 6.0)
    s1, s2 = (jnp.asarray(rng.normal(size=(2, 4, 8)), jnp.float32) for _ in range(2))
    np.testing.assert_array_equal(model(x, lead, s1), x)  # residual head at zero: persistence, whatever the fields
    model.head.kernel[...] = jnp.asarray(rng.normal(0, 0.1, model.head.kernel[...].shape), jnp.float32)
    out1, out2 = model(x, lead, s1), model(x, lead, s2)
    assert out1.shape == (3, 2, 4, 8) and float(jnp.abs(out1 - out2).max()) > 1e-3  # the forecast sees them
    np.testing.assert_allclose(model(x, lead, jnp.broadcast_to(s1, (3, 2, 4, 8))), out1, rtol=1e-6, atol=1e-6)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    grads = jax.grad(lambda p: jnp.sum(nnx.merge(graphdef, p, rest)(x, lead, s1) ** 2))(params)
    assert float(jnp.abs(grads["patch_kernel"][...][2:]).max()) > 0  # the static fields' own embeddings learn
    for bad in (None, s1[:1]):
        with pytest.raises(ValueError, match="the model takes 2 static fields of shape"):
            model(x, lead, bad)
    plain = ClimaX(ClimaXConfig(num_vars=2, lat=4, lon=8, patch_size=2, num_layers=1, num_heads=2, embed_dim=8,
                                mlp_dim=16), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="the model takes 0 static fields"):
        plain(x, lead, s1)


# --- randomized lead ------------------------------------------------------------------------------------------

def test_batches_draw_a_lead_per_pair_within_the_range():
    from sciscale_jax.data import weather as wx

    data = np.arange(2 * 12, dtype=np.float32).reshape(2, 12, 1, 1, 1) * np.ones((1, 1, 1, 2, 2), np.float32)
    fb = wx.ForecastBatches(data, lead_steps=1, max_lead_steps=3, interval_hours=6, batch_size=64, seed=1)
    b = fb.batch(5)
    steps = (b["y"] - b["x"])[:, 0, 0, 0]  # the state index is the value: y - x is the lead in intervals
    assert set(steps.tolist()) == {1.0, 2.0, 3.0}
    np.testing.assert_array_equal(b["lead"], steps * 6)
    assert b["x"][:, 0, 0, 0].max() % 12 <= 12 - 1 - 3  # every start leaves room for the longest lead
    rows = fb.batch_rows(5, 16, 40)
    for k in rows:
        np.testing.assert_array_equal(rows[k], b[k][16:40])
    one = wx.ForecastBatches(data, lead_steps=2, interval_hours=6, batch_size=8, seed=1).batch(5)
    np.testing.assert_array_equal(one["y"] - one["x"], 2.0)  # a single lead: as before
    with pytest.raises(ValueError, match=r"up to max_lead_steps=12\) must lie in \[1, 11\]"):
        wx.ForecastBatches(data, lead_steps=1, max_lead_steps=12, interval_hours=6, batch_size=8)
    with pytest.raises(ValueError, match="max_lead_steps=1 must be 0 or at least lead_steps=2"):
        weather_vit.RECIPE.make_config(lead_steps=2, max_lead_steps=1)


def test_a_run_on_several_leads_forecasts_at_each(tmp_path, capsys):
    times, z, t2 = _fields(times=24, hours=6)
    store = _write(_dataset(times, z, t2), tmp_path / "era.zarr")
    run = tmp_path / "run"
    assert cli.main(["train", "weather-vit", "--data", str(store), "--channels", "2m_temperature",
                     "--max-lead-steps", "3", "--val-fraction", "0.25", "--out", str(run), "--steps", "2",
                     *MODEL]) == 0
    capsys.readouterr()
    target = tmp_path / "fc.npz"
    assert cli.main(["embed", str(run), "--input", str(store), "--out", str(target)]) == 0
    got = np.load(target)
    assert got["forecast"].shape == (3, 24, 1, 8, 16) and got["lead_hours"].tolist() == [6, 12, 18]
    assert str(got["valid_time"][2, 0]) == "2020-01-01T18:00:00"
    model = load_run(run, log=lambda *_: None).model
    train = _lon_sorted(t2[:18]).astype(np.float64)
    x = ((_lon_sorted(t2[:4])[:, None] - train.mean()) / train.std()).astype(np.float32)
    for k, hours in enumerate((6, 12, 18)):
        want = np.asarray(model(x, np.full(4, float(hours), np.float32)))[:, 0] * train.std() + train.mean()
        np.testing.assert_allclose(got["forecast"][k, :4, 0], want, rtol=1e-5, atol=1e-3 * train.std())
    assert np.abs(got["forecast"][0] - got["forecast"][2]).max() > 0  # the lead embedding tells them apart
    assert cli.main(["embed", str(run), "--input", str(store), "--out", str(tmp_path / "fc.zarr")]) == 0
    fc = xr.open_zarr(tmp_path / "fc.zarr")
    assert (fc["prediction_timedelta"].values / np.timedelta64(1, "h")).tolist() == [6, 12, 18]
    np.testing.assert_array_equal(fc["2m_temperature"].values, np.moveaxis(got["forecast"][:, :, 0], 0, 1))
    assert not list(tmp_path.glob("*.partial"))


def test_direct_rollout_applies_the_model_once_at_each_lead(tmp_path):
    import jax.numpy as jnp
    from flax import nnx

    from sciscale_jax.data import weather as wx
    from sciscale_jax.models.climax import ClimaX

    times, z, t2 = _fields(times=24, hours=6)
    store = _write(_dataset(times, z, t2), tmp_path / "era.zarr")
    _, model_cfg, _ = cli.build_configs(["weather-vit", "--data", str(store), "--channels", "2m_temperature,"
                                         "geopotential@850", "--max-lead-steps", "3", "--val-fraction", "0.4", *MODEL])
    prep = weather_vit.prepare(model_cfg, log=lambda *_: None)
    model = ClimaX(model_cfg, rngs=nnx.Rngs(2))
    model.head.kernel[...] = jnp.asarray(np.random.default_rng(0).normal(0, 0.05, model.head.kernel[...].shape),
                                         jnp.float32)
    out = weather_vit.rollout(model, prep, 1, 3, every=2, batch_size=4, direct=True)
    val, std = prep.val_norm[0], prep.normalizer.std.astype(np.float64)
    starts = list(range(0, val.shape[0] - 3, 2))
    assert out["starts"] == len(starts) and out["lead_hours"] == [6, 12, 18]
    for k in (1, 2, 3):
        preds = np.asarray(model(jnp.asarray(val[starts]), jnp.full((len(starts),), 6.0 * k)))
        rmse = np.sqrt(wx.lat_weighted_mse(preds, val[[j + k for j in starts]], LAT)) * std
        for i, name in enumerate(model_cfg.variables):
            assert out["model"][name][k - 1] == pytest.approx(rmse[i], rel=1e-4)
    chained = weather_vit.rollout(model, prep, 1, 3, every=2, batch_size=4)
    assert chained["model"]["2m_temperature"][0] == pytest.approx(out["model"]["2m_temperature"][0], rel=1e-6)
    short = weather_vit.rollout(model, prep, 1, 1, every=2, batch_size=4, room=3)  # the same starts
    assert short["starts"] == out["starts"] and short["model"]["2m_temperature"] == pytest.approx(
        out["model"]["2m_temperature"][:1], rel=1e-6)
    assert weather_vit.rollout(model, prep, 1, 1, every=2, batch_size=4)["starts"] > out["starts"]
    assert chained["model"]["2m_temperature"][2] != pytest.approx(out["model"]["2m_temperature"][2], rel=1e-3)


def test_memory_estimates_take_the_batch_shapes_of_the_run(tmp_path):
    """The planner's abstract batch has the run's channels, static fields and grid (it took the
    default simulation's [B, 8, 32, 64] before, so `sciscale plan` refused every other grid)."""
    from sciscale_jax.train import TrainConfig
    from sciscale_jax.train.abstract import abstract_batch
    from sciscale_jax.train.estimate import estimate

    times, z, t2 = _fields(times=24, hours=6)
    ds = _dataset(times, z, t2).assign(orog=(("latitude", "longitude"), np.random.default_rng(0).normal(
        size=(8, 16)).astype(np.float32)))
    store = _write(ds, tmp_path / "era.zarr")
    recipe, model_cfg, train_cfg = cli.build_configs(["weather-vit", "--data", str(store), "--channels",
                                                      "2m_temperature,geopotential@850,geopotential@250",
                                                      "--static", "orog", "--val-fraction", "0.25", *MODEL])
    real = recipe.build_data(train_cfg, model_cfg).train.batch(0)
    shapes = abstract_batch(recipe, model_cfg, train_cfg)
    assert {k: (v.shape, v.dtype) for k, v in shapes.items()} == {k: (v.shape, v.dtype) for k, v in real.items()}
    assert shapes["static"].shape == (4, 1, 8, 16) and shapes["x"].shape == (4, 3, 8, 16)
    cfg = TrainConfig(**{**train_cfg.to_dict(), "mesh": "data=4,tensor=2", "batch_size": 8})
    est = estimate(recipe, model_cfg, cfg, method="trace")
    assert est.peak_bytes > 0


def test_a_multi_lead_run_is_scored_at_every_trained_lead(tmp_path):
    """The loss at each trained lead equals the model applied by hand to every held-out pair at
    that lead, and the persistence / climatology losses a plain formula; the headline figures stay
    those of lead_steps alone."""
    import types

    import jax.numpy as jnp
    from flax import nnx

    from sciscale_jax.models.climax import ClimaX

    times, z, t2 = _fields(times=24, hours=6)
    store = _write(_dataset(times, z, t2), tmp_path / "era.zarr")
    _, model_cfg, _ = cli.build_configs(["weather-vit", "--data", str(store), "--channels", "2m_temperature,"
                                         "geopotential@850", "--max-lead-steps", "3", "--val-fraction", "0.4", *MODEL])
    data = weather_vit.build_data(types.SimpleNamespace(batch_size=4, seed=0), model_cfg)
    model = ClimaX(model_cfg, rngs=nnx.Rngs(2))
    model.head.kernel[...] = jnp.asarray(np.random.default_rng(0).normal(0, 0.05, model.head.kernel[...].shape),
                                         jnp.float32)
    sums = {}
    for batch in data.eval:
        for name, (s, n) in weather_vit.eval_fn(model, {k: jnp.asarray(v) for k, v in batch.items()}).items():
            sums[name] = (sums.get(name, (0.0, 0.0))[0] + float(s), sums.get(name, (0.0, 0.0))[1] + float(n))
    means = {name: s / n for name, (s, n) in sums.items()}
    assert sorted(k for k in means if k.startswith("loss")) == ["loss", "loss_lead2", "loss_lead3"]
    prep = data.train.prepared
    val, clim = prep.val_norm[0], prep.clim_norm[0]  # [T, V, lat, lon], normalized
    w = np.cos(np.deg2rad(LAT))[:, None] / np.cos(np.deg2rad(LAT)).mean()
    for k, name in ((1, "loss"), (2, "loss_lead2"), (3, "loss_lead3")):
        x, y = val[:-k], val[k:]
        pred = np.asarray(model(jnp.asarray(x), jnp.full((len(x),), 6.0 * k)))
        assert means[name] == pytest.approx(float(np.mean(w * (pred - y) ** 2)), rel=1e-4)
        if k > 1:
            assert data.baselines[f"persistence_loss_lead{k}"] == pytest.approx(float(np.mean(w * (x - y) ** 2)),
                                                                                 rel=1e-5)
            assert data.baselines[f"climatology_loss_lead{k}"] == pytest.approx(
                float(np.mean(w * (clim[k:] - y) ** 2)), rel=1e-5)
    # A run on one lead keeps its batches and figures as they were: no lead_index, no per-lead names.
    one = weather_vit.build_data(types.SimpleNamespace(batch_size=4, seed=0),
                                 dataclasses.replace(model_cfg, max_lead_steps=0))
    assert "lead_index" not in one.eval[0] and not [k for k in one.baselines if "_lead" in k]
