"""Host memory and time of weather-vit's data preparation on the user's own fields (CPU).

Writes a Zarr store shaped like WeatherBench 2's 64 x 32 ERA5 (6-hourly, a 3-level variable and a
surface variable, north-to-south latitudes), then runs ``build_data`` of `sciscale train weather-vit
--data ...` in a fresh process per repeat and reports its peak resident set size (``ru_maxrss``)
and wall time, beside the size of the float32 fields read. RSS, not XLA's memory analysis: this
is host-side numpy and xarray work, no compiled step.

    python benchmarks/weather_fields_memory.py --states 20000 --json benchmarks/results/weather_fields_memory.json
"""

from __future__ import annotations

import argparse
import json
import pathlib
import subprocess
import sys
import tempfile

CHANNELS = "temperature@250,temperature@500,temperature@850,2m_temperature"

_CHILD = """
import json, resource, sys, time
from sciscale_jax import cli
recipe, model_cfg, train_cfg = cli.build_configs(["weather-vit", "--data", sys.argv[1], "--channels", sys.argv[2],
                                                  "--val-start", sys.argv[3]])
t0 = time.perf_counter()
data = recipe.build_data(train_cfg, model_cfg)
seconds = time.perf_counter() - t0
print(json.dumps({"seconds": seconds, "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                  "summary": data.summary}))
"""


def write_store(path: pathlib.Path, states: int) -> int:
    """The store of ``states`` 6-hourly states from 1990; returns the bytes of the 4 float32 channels read."""
    import warnings

    import numpy as np
    import pandas as pd
    import xarray as xr

    lat = -90 + (np.arange(32) + 0.5) * 180 / 32
    rng = np.random.default_rng(0)
    ds = xr.Dataset(coords={"time": pd.date_range("1990-01-01", periods=states, freq="6h"), "level": [250, 500, 850],
                            "latitude": lat[::-1], "longitude": np.arange(64) * 5.625})
    ds["temperature"] = (("time", "level", "latitude", "longitude"),
                         (250 + rng.normal(size=(states, 3, 32, 64))).astype(np.float32))
    ds["2m_temperature"] = (("time", "latitude", "longitude"),
                            (280 + rng.normal(size=(states, 32, 64))).astype(np.float32))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds.chunk({"time": 1000}).to_zarr(path, mode="w")
    return states * 4 * 32 * 64 * 4


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--states", type=int, default=20000, help="6-hourly states in the store (20000: 13.7 years)")
    parser.add_argument("--val-start", default="2000-01-01", help="held out from this date")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--json", help="write the figures here")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        store = pathlib.Path(tmp) / "fields.zarr"
        fields_bytes = write_store(store, args.states)
        runs = []
        for _ in range(args.repeats):
            out = subprocess.run([sys.executable, "-c", _CHILD, str(store), CHANNELS, args.val_start],
                                 check=True, capture_output=True, text=True).stdout
            runs.append(json.loads(out.strip().splitlines()[-1]))
    peak = min(r["peak_rss_bytes"] for r in runs)
    result = {"states": args.states, "channels": CHANNELS, "grid": [32, 64], "fields_bytes": fields_bytes,
              "peak_rss_bytes": peak, "peak_over_fields": peak / fields_bytes,
              "seconds": [round(r["seconds"], 2) for r in runs], "summary": runs[0]["summary"]}
    print(f"{args.states} states x 4 channels on 32 x 64: fields {fields_bytes / 2**30:.2f} GiB; build_data peak RSS "
          f"{peak / 2**30:.2f} GiB ({peak / fields_bytes:.1f}x), {min(result['seconds']):.1f} s")
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
