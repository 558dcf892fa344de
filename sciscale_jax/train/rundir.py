"""The run directory (``--out``): checks before anything is written, and a lock against a second run.

- :func:`preflight` refuses, without writing, an ``--out`` that is a file, lies under a file,
  cannot be created or written, or (with ``resume``) holds no checkpoint to resume from.
- :class:`RunLock` takes an exclusive ``fcntl.flock`` on the directory itself, so a second
  run on the same ``--out`` is refused in one line naming the process that holds it. The
  kernel drops the lock when its process exits, however it exits, so a lock is never
  stale; the pid file ``.sciscale.lock`` beside it only serves the error message and is
  removed on release.
- :func:`check_data_unchanged` refuses, before the data is read, to resume a run whose recorded
  data files changed since (packing a changed corpus again, only to refuse it, would take minutes).
- :func:`keep_schedule` makes ``--steps N --resume`` keep the learning-rate schedule of the
  run being extended: a config that leaves ``schedule_steps`` at 0 gets the saved run's
  schedule length.
"""

from __future__ import annotations

import dataclasses
import errno
import fcntl
import json
import os
import pathlib

from sciscale_jax.data import files

LOCK_FILE = ".sciscale.lock"
CONFIG_FILE = "run_config.json"


def has_checkpoints(run_dir) -> bool:
    ckpts = pathlib.Path(run_dir) / "checkpoints"
    return ckpts.is_dir() and any(p.name.isdigit() for p in ckpts.iterdir())


def preflight(run_dir, *, resume: bool) -> None:
    """Refuse an ``--out`` this run cannot use, before anything is written there (ValueError, one line)."""
    run_dir = pathlib.Path(run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise ValueError(f"--out {run_dir} is an existing file, not a directory; choose another --out")
    existing = run_dir
    while not existing.exists():  # the nearest ancestor that exists must be a writable directory
        existing = existing.parent
    if not existing.is_dir():
        raise ValueError(f"--out {run_dir} lies under {existing}, which is a file, not a directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"--out {run_dir}: {existing} is not writable (permission denied or read-only)")
    if resume and not has_checkpoints(run_dir):
        where = "does not exist" if not run_dir.exists() else "holds no checkpoint"
        raise ValueError(f"--resume: {run_dir} {where}; check --out, or drop --resume to start a new run")


def saved_config(run_dir) -> dict | None:
    """The ``run_config.json`` saved in ``run_dir``, or None if absent or unreadable."""
    try:
        return json.loads((pathlib.Path(run_dir) / CONFIG_FILE).read_text())
    except (OSError, ValueError):
        return None


STATS_FILE = "data_stats.npz"


def write_data_stats(run_dir, stats: dict) -> None:
    """``Data.stats`` into ``run_dir/data_stats.npz``: written whole under another name, then renamed
    (a run killed while writing leaves the previous file, or none)."""
    import numpy as np

    run_dir = pathlib.Path(run_dir)
    partial = run_dir / (STATS_FILE + ".partial")
    with open(partial, "wb") as f:
        np.savez(f, **{k: np.asarray(v) for k, v in stats.items()})
    os.replace(partial, run_dir / STATS_FILE)


def read_data_stats(run_dir) -> dict | None:
    """The ``Data.stats`` a run saved (``write_data_stats``), or None where it saved none (a run of
    a recipe without, or of an earlier version); ValueError in one line for an unreadable file."""
    import numpy as np

    path = pathlib.Path(run_dir) / STATS_FILE
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as f:
            return {k: f[k] for k in f.files}
    except Exception as err:  # zipfile, numpy and OS errors: one line
        raise ValueError(f"{path} is unreadable ({type(err).__name__}: {err}); remove it to have the training "
                         "data read again") from None


def check_data_unchanged(run_dir, *, resume: bool, force: bool, bytes_digests: bool = True) -> None:
    """When resuming without ``force``: ValueError in one line if a data file the saved run
    recorded (``data_files``: path -> SHA-256 of its bytes) is gone or its bytes differ now, naming
    the digests (``checkpoint.check_run_dir`` would refuse it too, but only after the data is read).
    Nothing is checked where the digests are not of the files' bytes (``bytes_digests`` False)."""
    if not resume or force or not bytes_digests:
        return
    recorded = (saved_config(run_dir) or {}).get("data_files") or {}
    if not isinstance(recorded, dict):
        return
    diff = files.changed(recorded, digits=64)
    if diff:
        raise ValueError(f"output directory {run_dir} holds a different run; its data changed since: "
                         + "; ".join(diff) + ". Restore the files, choose another --out, or pass --force to "
                         "resume on the data as it is now.")


def keep_schedule(run_dir, train_config, *, resume: bool):
    """``train_config`` with ``schedule_steps`` set to the saved run's schedule length when resuming.

    An explicit ``schedule_steps`` is kept (``check_run_dir`` then refuses a change without force).
    """
    if not resume or train_config.schedule_steps:
        return train_config
    saved = (saved_config(run_dir) or {}).get("train", {})
    length = saved.get("schedule_steps") or saved.get("steps")
    if not isinstance(length, int) or isinstance(length, bool) or length < 1 or length == train_config.steps:
        return train_config
    return dataclasses.replace(train_config, schedule_steps=length)


def keep_init(run_dir, train_config, *, resume: bool):
    """``train_config`` with the saved run's ``init_from`` / ``init_step`` when resuming with them
    left out or the same (a resumed run reads its own checkpoint; the record of where it started
    stays). Other values are kept, so ``check_run_dir`` refuses them as a different run."""
    if not resume:
        return train_config
    saved = (saved_config(run_dir) or {}).get("train", {})
    init_from, init_step = saved.get("init_from"), saved.get("init_step")
    if not isinstance(init_from, str) or not init_from or not isinstance(init_step, int):
        return train_config
    if train_config.init_from not in ("", init_from) or train_config.init_step not in (0, init_step):
        return train_config
    return dataclasses.replace(train_config, init_from=init_from, init_step=init_step)


class RunLock:
    """Exclusive lock on a run directory for the life of a run (context manager)."""

    def __init__(self, run_dir):
        self.run_dir = pathlib.Path(run_dir)
        self._fd: int | None = None

    def acquire(self) -> "RunLock":
        self.run_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.run_dir, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            os.close(fd)
            if err.errno not in (errno.EWOULDBLOCK, errno.EACCES):
                raise
            holder = self._holder()
            raise RuntimeError(f"output directory {self.run_dir} is in use by another run{holder}; wait for it to "
                               "finish or choose another --out") from None
        self._fd = fd
        return self

    def _holder(self) -> str:
        try:
            info = json.loads((self.run_dir / LOCK_FILE).read_text())
            return f" (pid {info['pid']} on {info['host']})"
        except (OSError, ValueError, KeyError, TypeError):
            return ""

    def write_pid(self) -> None:
        """Record this process in ``.sciscale.lock`` (for the message a second run prints)."""
        (self.run_dir / LOCK_FILE).write_text(json.dumps({"pid": os.getpid(), "host": os.uname().nodename}))

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            (self.run_dir / LOCK_FILE).unlink(missing_ok=True)
        except OSError:
            pass
        fcntl.flock(self._fd, fcntl.LOCK_UN)
        os.close(self._fd)
        self._fd = None

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
