"""sciscale_jax.train"""
