"""sciscale_jax.data"""
