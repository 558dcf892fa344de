"""Memory: measure (compiled memory analysis), estimate, plan."""

from sciscale_jax.memory.measure import MemoryReport, compiled_memory, report_from_analysis, tree_bytes

__all__ = ["MemoryReport", "compiled_memory", "report_from_analysis", "tree_bytes"]
