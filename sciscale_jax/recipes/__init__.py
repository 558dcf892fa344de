"""sciscale_jax.recipes"""
