"""sciscale_jax.quant"""
