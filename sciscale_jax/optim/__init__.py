"""sciscale_jax.optim"""
