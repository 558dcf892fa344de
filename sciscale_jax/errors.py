"""One line and an exit status for each way a ``sciscale`` command can end badly.

The CLI prints ``sciscale: <line>`` on stderr and returns the status; ``--debug`` shows the
traceback instead. Statuses: 2 bad input (ValueError, a missing file or package), 1 an
operating-system or runtime failure, 128 + N a stop on signal N (130 SIGINT, 143 SIGTERM).
"""

from __future__ import annotations

import errno

_OS_REASONS = {
    errno.ENOSPC: "no space left on device",
    errno.EROFS: "read-only file system",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
    errno.ENOTDIR: "a path component is a file, not a directory",
    errno.EISDIR: "is a directory",
    errno.EEXIST: "already exists",
    errno.ENOENT: "no such file or directory",
    errno.EDQUOT: "disk quota exceeded",
}


def first_line(text: str, limit: int = 600) -> str:
    """The first non-empty line of ``text``, cut at ``limit`` characters."""
    line = next((s.strip() for s in str(text).splitlines() if s.strip()), "")
    return line if len(line) <= limit else line[:limit - 3] + "..."


def describe(err: BaseException) -> tuple[int, str]:
    """(exit status, one line without the ``sciscale:`` prefix) for ``err``."""
    from sciscale_jax.train.signals import RunInterrupted

    if isinstance(err, RunInterrupted):
        return err.exit_code, first_line(err)
    if isinstance(err, KeyboardInterrupt):
        return 130, ("interrupted; checkpoints written before the interruption are kept (a partial one is "
                     "removed); continue with --resume")
    if isinstance(err, (ValueError, ImportError)) or (isinstance(err, FileNotFoundError) and not err.filename):
        return 2, "error: " + first_line(err)
    if isinstance(err, OSError):
        reason = _OS_REASONS.get(err.errno, err.strerror or type(err).__name__)
        path = f": {err.filename}" if err.filename else ""
        if err.filename2:
            path += f" -> {err.filename2}"
        return (2 if isinstance(err, FileNotFoundError) else 1), f"error: {reason}{path}"
    if isinstance(err, MemoryError):
        return 1, "error: out of host memory (MemoryError); try a smaller --batch-size or model"
    if isinstance(err, RuntimeError) and type(err).__module__.startswith("sciscale_jax") or type(err) is RuntimeError:
        return 1, "error: " + first_line(err)
    return 1, f"error: {type(err).__name__}: {first_line(err)} (rerun with --debug for the traceback)"
