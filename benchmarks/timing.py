"""Wall-clock timing shared by the benchmark scripts: median of timed runs after compile and warm-up."""

import statistics
import time

import jax


def median_seconds(fn, args, runs: int) -> float:
    """Median wall time of ``fn(*args)`` over ``runs`` calls, after one compiling and one warm-up call."""
    jax.block_until_ready(fn(*args))  # compile
    jax.block_until_ready(fn(*args))  # warm-up
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return statistics.median(times)
