"""Row ranges of a global batch: what one process of a multi-process run builds.

A data source that can build part of a batch defines ``batch_rows(step, start, stop)``: rows
``start:stop`` of ``batch(step)``, bit for bit, without building the other rows
(``sciscale_jax.parallel.multihost.global_batch`` calls it with the rows this process's
devices hold).
"""

from __future__ import annotations


def check_rows(start: int, stop: int, batch_size: int) -> None:
    """ValueError unless ``0 <= start < stop <= batch_size`` (integers)."""
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in (start, stop)) \
            or not 0 <= start < stop <= batch_size:
        raise ValueError(f"rows start={start!r}, stop={stop!r} must satisfy 0 <= start < stop <= "
                         f"batch_size={batch_size}")
