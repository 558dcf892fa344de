"""sciscale_jax.memory"""
