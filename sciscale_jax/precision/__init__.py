"""sciscale_jax.precision"""
