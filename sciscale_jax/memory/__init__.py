"""Memory: measure (compiled memory analysis), estimate, plan."""

from sciscale_jax.memory.measure import MemoryReport, compiled_memory, report_from_analysis, tree_bytes
from sciscale_jax.memory.estimate import Estimate, estimate

__all__ = ["Estimate", "MemoryReport", "compiled_memory", "estimate", "report_from_analysis", "tree_bytes"]
