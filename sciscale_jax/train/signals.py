"""Stop a training run cleanly on SIGINT (Ctrl-C) or SIGTERM (what Slurm and Kubernetes send first).

``StopSignals`` is a context manager that replaces the handlers of both signals with one
that only records the signal. The loop asks ``stop.requested`` at each step boundary and,
when set, ends as after its last step: the checkpoint being written finishes, a final
checkpoint of the current step is written, and :class:`RunInterrupted` carries the exit
status a shell expects (128 + signal number: 130 for SIGINT, 143 for SIGTERM). A second
SIGINT while stopping raises ``KeyboardInterrupt`` at once, for a user who cannot wait. The
previous handlers come back on exit. Outside the main thread signals cannot be caught, and
the context manager does nothing.
"""

from __future__ import annotations

import signal
import threading

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class RunInterrupted(Exception):
    """A run stopped on a signal after saving; ``exit_code`` is 128 + the signal number."""

    def __init__(self, signum: int, message: str):
        super().__init__(message)
        self.signum = signum
        self.exit_code = 128 + signum


class StopSignals:
    """Record SIGINT/SIGTERM instead of raising, so the loop can stop at a step boundary."""

    def __init__(self):
        self.signum: int | None = None
        self._previous: dict = {}

    @property
    def requested(self) -> bool:
        return self.signum is not None

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum is not None else ""

    def _handle(self, signum, frame):
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # second Ctrl-C: stop now
        self.signum = signum

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            for sig in SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
