"""The logical-axis vocabulary, re-exported where the rule tables use it (``sciscale_jax.axes``)."""

from sciscale_jax.axes import *  # noqa: F401,F403
from sciscale_jax.axes import LOGICAL_AXES

__all__ = ["LOGICAL_AXES"]
