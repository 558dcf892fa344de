"""Block sizes and stage counts for the sm90 attention kernels: measured on the GPU, cached.

The first call of ``flash_attention_sm90`` (or its backward) for a shape class (device kind,
pass, head_dim, dtype, causal, bias or not, key bias or not, sequence lengths rounded up to
powers of two) times each candidate configuration on random inputs of the call's shapes (median
of 5 runs after a compiling and a warm-up run), keeps the fastest, and writes it to a JSON cache,
so later calls and later processes reuse it; a candidate new to a cached choice has it measured
again. Candidates that fail to compile (shared memory) are skipped.
This happens while the caller is being traced, on a thread of its own (jax's trace state is
per thread, so the candidates run as ordinary computations).

Cache file: ``$SCISCALE_SM90_TUNING`` or ``~/.cache/sciscale_jax/sm90_tuning.json``; set
``SCISCALE_SM90_TUNING=off`` to use the defaults without measuring.
"""

from __future__ import annotations

import json
import math
import os
import statistics
import tempfile
import threading
import time
from typing import Callable, Sequence

import jax

DEFAULT_PATH = os.path.join(os.path.expanduser("~"), ".cache", "sciscale_jax", "sm90_tuning.json")


def cache_path() -> str | None:
    path = os.environ.get("SCISCALE_SM90_TUNING", DEFAULT_PATH)
    return None if path.lower() == "off" else path


def median_seconds(fn: Callable[[], object], runs: int = 5) -> float:
    """Median wall time of ``fn()`` over ``runs`` calls, after one compiling and one warm-up call
    (the benchmarks time with it too: ``benchmarks/timing.py``)."""
    jax.block_until_ready(fn())  # compile
    jax.block_until_ready(fn())  # warm-up
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def shape_key(kind: str, pass_name: str, head_dim: int, dtype, causal: bool, biased: bool, q_len: int,
              kv_len: int, key_bias: bool = False) -> str:
    pow2 = lambda n: 1 << max(0, math.ceil(math.log2(max(n, 1))))  # noqa: E731
    return (f"{kind}|{pass_name}|d{head_dim}|{jax.numpy.dtype(dtype).name}|{'causal' if causal else 'full'}|"
            f"{'bias' if biased else 'nobias'}{'+keys' if key_bias else ''}|q{pow2(q_len)}|k{pow2(kv_len)}")


class Tuner:
    """best(key, candidates, make_run) -> the fastest candidate, measured once per key and cached.

    ``make_run(candidate)`` returns a zero-argument function running the kernel with that
    configuration; ``measure(fn)`` returns its time in seconds (``median_seconds`` by default).
    """

    def __init__(self, path: str | None = None, measure: Callable[[Callable[[], object]], float] = median_seconds):
        self.path, self.measure = path, measure
        self._lock = threading.Lock()
        self._cache: dict | None = None

    def _load(self) -> dict:
        if self._cache is None:
            self._cache = {}
            if self.path and os.path.exists(self.path):
                try:
                    with open(self.path) as f:
                        loaded = json.load(f)
                    self._cache = loaded if isinstance(loaded, dict) else {}
                except (OSError, ValueError):  # unreadable or corrupt: measure again, rewrite it
                    self._cache = {}
        return self._cache

    def _save(self) -> None:
        if not self.path:
            return
        os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(self.path) or ".", suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            json.dump(self._cache, f, indent=1, sort_keys=True)
        os.replace(tmp, self.path)  # whole or not at all: a kill mid-write leaves the old file

    def best(self, key: str, candidates: Sequence[tuple], make_run: Callable[[tuple], Callable[[], object]]):
        with self._lock:
            cache = self._load()
            hit, wanted = cache.get(key), {tuple(c) for c in candidates}
            # A cached choice stands while it is still a candidate and no candidate is new to it.
            if (hit is not None and tuple(hit["config"]) in wanted
                    and wanted <= {tuple(c) for c in hit.get("candidates", ())}):
                return tuple(hit["config"])
            times = {}
            for candidate in candidates:
                try:
                    times[tuple(candidate)] = self.measure(make_run(tuple(candidate)))
                except Exception:  # noqa: BLE001 - a configuration that does not compile or run is skipped
                    continue
            if not times:
                return None
            best = min(times, key=times.get)
            cache[key] = {"config": list(best), "candidates": [list(c) for c in candidates],
                          "ms": {",".join(map(str, c)): round(t * 1e3, 4) for c, t in times.items()}}
            self._save()
            return best


_TUNER: Tuner | None = None


def default_tuner() -> Tuner | None:
    """The process-wide tuner on ``cache_path()``, or None where tuning is off."""
    global _TUNER
    path = cache_path()
    if path is None:
        return None
    if _TUNER is None or _TUNER.path != path:
        _TUNER = Tuner(path)
    return _TUNER
