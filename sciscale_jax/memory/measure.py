"""Memory, measured: per-device bytes from XLA's compiled memory analysis, and pytree sizes.

``compiled_memory`` lowers and compiles a function for the given arguments (nothing runs)
and reads ``memory_analysis()``: on CPU this is deterministic, so tests and benchmarks can
compare techniques byte for byte. For an SPMD program the figures are per device.
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np

MiB = 2.0 ** 20


def analysis_options(backend: str | None = None) -> dict:
    """XLA options for a compile that is only read for its memory analysis, never run: on CPU
    the LLVM code generator skips its optimisation passes (1.4-1.9x faster compiles of the
    planner's probes), which come after buffer assignment and leave every figure of
    ``memory_analysis()`` as it was (``tests/test_planner.py`` compares the two). Elsewhere
    nothing is changed."""
    backend = backend or jax.default_backend()
    if backend != "cpu":
        return {}
    return {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


@dataclasses.dataclass(frozen=True)
class MemoryReport:
    """Per-device bytes of one compiled program. peak = arguments + outputs + temps - aliases."""

    argument_bytes: int
    output_bytes: int
    temp_bytes: int
    alias_bytes: int
    generated_code_bytes: int = 0
    host_temp_bytes: int = 0
    host_argument_bytes: int = 0   # e.g. optimizer state offloaded to pinned host memory
    host_output_bytes: int = 0

    @property
    def peak_bytes(self) -> int:
        return self.argument_bytes + self.output_bytes + self.temp_bytes - self.alias_bytes

    def as_dict(self) -> dict:
        return {**dataclasses.asdict(self), "peak_bytes": self.peak_bytes}

    def format(self, title: str = "memory per device") -> str:
        rows = [("arguments", self.argument_bytes), ("outputs", self.output_bytes),
                ("temporaries", self.temp_bytes), ("aliased (donated)", -self.alias_bytes),
                ("peak", self.peak_bytes)]
        if self.host_argument_bytes or self.host_output_bytes:  # not part of the device peak
            rows += [("host arguments", self.host_argument_bytes), ("host outputs", self.host_output_bytes)]
        width = max(len(name) for name, _ in rows)
        lines = [f"{title} (XLA compiled memory analysis)"]
        lines += [f"  {name:<{width}}  {value / MiB:10.2f} MiB" for name, value in rows]
        return "\n".join(lines)


def report_from_analysis(analysis) -> MemoryReport:
    """A MemoryReport from the object ``Compiled.memory_analysis()`` returns."""
    if analysis is None:
        raise RuntimeError("this backend returns no compiled memory analysis")
    get = lambda name: int(getattr(analysis, name, 0) or 0)  # noqa: E731
    return MemoryReport(
        argument_bytes=get("argument_size_in_bytes"),
        output_bytes=get("output_size_in_bytes"),
        temp_bytes=get("temp_size_in_bytes"),
        alias_bytes=get("alias_size_in_bytes"),
        generated_code_bytes=get("generated_code_size_in_bytes"),
        host_temp_bytes=get("host_temp_size_in_bytes"),
        host_argument_bytes=get("host_argument_size_in_bytes"),
        host_output_bytes=get("host_output_size_in_bytes"),
    )


def compiled_memory(fn, *args, **kwargs) -> MemoryReport:
    """Compile ``fn`` for these arguments (arrays or ShapeDtypeStructs) and report its memory.

    ``fn`` may already be jitted (its shardings and donations are then kept); otherwise it
    is wrapped in ``jax.jit`` with default settings. It compiles with the XLA options the train
    loop uses (``remat.compiler_options``: on CPU, remat barriers kept), so the report is the
    memory of the program that would run.
    """
    from sciscale_jax.remat import compiler_options

    jitted = fn if hasattr(fn, "lower") else jax.jit(fn)
    return report_from_analysis(jitted.lower(*args, **kwargs).compile(compiler_options()).memory_analysis())


def tree_bytes(tree) -> int:
    """Total bytes of the arrays (or ShapeDtypeStructs) in a pytree, over all devices' logical shapes."""
    return int(sum(np.prod(x.shape, dtype=np.int64) * np.dtype(x.dtype).itemsize
                   for x in jax.tree.leaves(tree) if hasattr(x, "shape") and hasattr(x, "dtype")))
