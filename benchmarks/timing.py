"""Wall-clock timing shared by the benchmark scripts: median of timed runs after compile and warm-up
(the same measurement the sm90 tuner makes, ``sciscale_jax.kernels.sm90_tuning.median_seconds``)."""

from sciscale_jax.kernels import sm90_tuning


def median_seconds(fn, args, runs: int) -> float:
    """Median wall time of ``fn(*args)`` over ``runs`` calls, after one compiling and one warm-up call."""
    return sm90_tuning.median_seconds(lambda: fn(*args), runs)
