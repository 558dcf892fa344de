"""sciscale_jax: memory-efficient training of transformer models for science, in JAX."""

__version__ = "0.1.0"
