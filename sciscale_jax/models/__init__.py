"""sciscale_jax.models"""
