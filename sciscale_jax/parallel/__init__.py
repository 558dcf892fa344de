"""Meshes, logical-axis rules and parallel strategies."""

from sciscale_jax.parallel.axes import LOGICAL_AXES

__all__ = ["LOGICAL_AXES"]
