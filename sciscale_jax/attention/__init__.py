"""Attention: one front door, implementations behind it."""

from sciscale_jax.attention.core import available, check_shapes, dot_product_attention, register, validate_impl
from sciscale_jax.attention.xla import xla_attention

__all__ = ["available", "check_shapes", "dot_product_attention", "register", "validate_impl", "xla_attention"]
