"""Memory: measure (compiled memory analysis), estimate and plan arithmetic (the drivers that
build a recipe's run for them live in ``sciscale_jax.train.estimate`` and ``train.plan``)."""

from sciscale_jax.memory.estimate import Estimate
from sciscale_jax.memory.measure import MemoryReport, compiled_memory, report_from_analysis, tree_bytes

__all__ = ["Estimate", "MemoryReport", "compiled_memory", "report_from_analysis", "tree_bytes"]
