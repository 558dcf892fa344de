"""Training batches built ahead of the step that uses them, in background threads.

A recipe's batches are a pure function of the step (``source.batch(step)``), so the batches of
the next steps can be built while the device runs this one, and nothing about the run changes:
:class:`Prefetch` hands out bit for bit the batches the loop would build itself, in step order.
Building runs in threads: NumPy releases the GIL in the array work batch building consists of
(the AlphaFold features' clustering, gathers, one-hot encodings), and the reads are ``pread``s
and memory maps, safe from several threads. Batches stay in host memory until the loop places
the one it needs: those built ahead take no device memory.
"""

from __future__ import annotations

import collections
import concurrent.futures


class Prefetch:
    """``prefetch(step)`` returns ``build(step)`` for steps ``start, start + 1, ...`` (asked in
    that order, below ``stop``), each built ``depth`` steps ahead by one of ``depth`` threads;
    ``depth`` 0 builds in the caller's thread when asked. An exception raised building a batch
    is raised by the call for that step, as it would be without prefetching. Use as a context
    manager: leaving it drops the batches not yet asked for (waiting for those being built)."""

    def __init__(self, build, start: int, stop: int, depth: int):
        if not isinstance(depth, int) or depth < 0:
            raise ValueError(f"prefetch depth={depth!r} must be an integer >= 0")
        self.build, self.next, self.stop, self.depth = build, start, stop, depth
        self.pending: collections.deque = collections.deque()
        self.pool = (concurrent.futures.ThreadPoolExecutor(depth, thread_name_prefix="sciscale-batches")
                     if depth else None)
        self._fill()

    def _fill(self) -> None:
        while self.pool is not None and len(self.pending) < self.depth and self.next < self.stop:
            self.pending.append((self.next, self.pool.submit(self.build, self.next)))
            self.next += 1

    def __call__(self, step: int):
        if self.pool is None:
            return self.build(step)
        if not self.pending or self.pending[0][0] != step:
            raise ValueError(f"batch of step {step} asked out of order (next built: "
                             f"{self.pending[0][0] if self.pending else self.next})")
        _, future = self.pending.popleft()
        self._fill()  # the next one starts before this one is waited for
        return future.result()

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)
            self.pending.clear()

    def __enter__(self) -> "Prefetch":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
