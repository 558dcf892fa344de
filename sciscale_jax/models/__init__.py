"""Flax NNX models."""

from sciscale_jax.models.transformer import Transformer, TransformerConfig

__all__ = ["Transformer", "TransformerConfig"]
