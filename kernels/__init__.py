"""Pallas kernels, importable as ``sciscale_jax.kernels``. Kernels import only jax."""
