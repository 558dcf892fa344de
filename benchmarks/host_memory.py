"""Host-memory benchmarks shared by the data-preparation scripts: run a recipe's ``build_data`` in a
fresh process and read its peak resident set size (``ru_maxrss``; the operating system's file
cache is not counted), its wall time and the time to draw a training batch."""

from __future__ import annotations

import json
import os
import subprocess
import sys

CHILD = """
import json, resource, sys, time
from sciscale_jax import cli
recipe, model_cfg, train_cfg = cli.build_configs(sys.argv[2:])
t0 = time.perf_counter()
data = recipe.build_data(train_cfg, model_cfg)
seconds = time.perf_counter() - t0
t0 = time.perf_counter()
for step in range(int(sys.argv[1])):
    data.train.batch(step)
batch_seconds = (time.perf_counter() - t0) / int(sys.argv[1])
print(json.dumps({"seconds": seconds, "batch_seconds": batch_seconds, "summary": data.summary[:300],
                  "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))
"""


def build_data_child(args, cache, *, python=sys.executable, batches: int = 200) -> dict:
    """``build_data`` of ``sciscale train ARGS`` in a fresh ``python`` with ``SCISCALE_CACHE=cache``:
    seconds, mean seconds per batch over ``batches``, peak RSS bytes, the data line."""
    env = {**os.environ, "SCISCALE_CACHE": str(cache), "JAX_PLATFORMS": "cpu"}
    # Run outside the repository, so ``python -c`` imports the sciscale_jax installed for ``python``.
    out = subprocess.run([python, "-c", CHILD, str(batches), *map(str, args)], env=env, check=True,
                         capture_output=True, cwd=cache.parent, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def print_rows(rows: dict) -> None:
    for name, r in rows.items():
        print(f"  {name:22s} peak RSS {r['peak_rss_bytes'] / 2**30:5.2f} GiB   build_data {r['seconds']:6.1f} s   "
              f"batch {r['batch_seconds'] * 1e3:6.2f} ms")
