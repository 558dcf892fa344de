"""Cache folders keyed by the content of the user's files: what a data reader derived from them
once (a packed corpus, packed alignments) is kept on disk and read by later runs.

``cached(kind, paths, key, load, write)`` hashes the files (SHA-256, what a run records of its
data anyway), names a folder ``<root>/<kind>/<hash of format, key and digests>``, and returns
``load(folder)`` where that succeeds. Otherwise one process at a time (a lock file beside the
folder: the processes of a multi-process run start at once) calls ``write(partial)`` into a
temporary folder and renames it into place when complete, so a writer killed mid-way leaves
nothing a later run reads, and a partial folder whose writer is gone is removed by the next
writer. The root is ``$SCISCALE_CACHE``, else ``~/.cache/sciscale_jax`` (where the weather
simulation and the curated SMILES are cached too).
"""

from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import json
import os
import pathlib
import shutil
import socket
import sys
import tempfile
import threading

from sciscale_jax.data import files


def cache_root() -> pathlib.Path:
    """Where sciscale_jax caches what it derives from data: ``$SCISCALE_CACHE``, else
    ``~/.cache/sciscale_jax``."""
    env = os.environ.get("SCISCALE_CACHE")
    return pathlib.Path(env).expanduser() if env else pathlib.Path.home() / ".cache" / "sciscale_jax"


class Reader:
    """Bytes at any offset of one file, through a file kept open (one per process: a forked child
    opens its own; the file closes itself when the reader is collected). Safe from several threads
    (batches built ahead): ``pread`` keeps no file position, and the file is opened once."""

    def __init__(self, path):
        self.path, self._file, self._opening = pathlib.Path(path), None, threading.Lock()

    def read(self, size: int, offset: int) -> bytes:
        held = self._file  # read once: another thread may replace it after a fork
        if held is None or held[0] != os.getpid():
            with self._opening:
                if self._file is None or self._file[0] != os.getpid():
                    self._file = (os.getpid(), open(self.path, "rb"))
                held = self._file
        return os.pread(held[1].fileno(), size, offset)


def _stale(partial: pathlib.Path) -> bool:
    """A partial folder whose writer (a process of this host) is no longer running."""
    try:
        writer = json.loads((partial / "writer.json").read_text())
        if writer["host"] != socket.gethostname():
            return False
        os.kill(int(writer["pid"]), 0)
    except ProcessLookupError:
        return True
    except (OSError, ValueError, KeyError, TypeError):
        return False
    return False


def _write(folder: pathlib.Path, load, write, sources: dict) -> None:
    """``write`` into a partial folder beside ``folder`` (with ``sources.json``: the files it was
    written from and their SHA-256), then rename it to ``folder``."""
    for partial in folder.parent.glob(f"{folder.name}.partial.*"):
        if _stale(partial):
            shutil.rmtree(partial, ignore_errors=True)
    partial = pathlib.Path(tempfile.mkdtemp(prefix=f"{folder.name}.partial.", dir=folder.parent))
    try:
        (partial / "writer.json").write_text(json.dumps({"host": socket.gethostname(), "pid": os.getpid()}))
        (partial / "sources.json").write_text(json.dumps(sources, indent=1))
        try:
            write(partial)
        except OSError as err:  # no space left, quota, permissions: one line, nothing left behind
            raise ValueError(f"writing the cache folder {folder} failed ({err.strerror or err}); free space "
                             "there or set SCISCALE_CACHE to another folder") from None
        if load(folder) is not None:
            return  # another process (without a lock) wrote it first: its folder is kept
        if folder.exists():  # damaged or of another format: replaced
            shutil.rmtree(folder, ignore_errors=True)
        try:
            partial.rename(folder)
        except OSError:  # another process renamed its folder into place in between
            pass
    finally:
        shutil.rmtree(partial, ignore_errors=True)


def cached(kind: str, paths, key, load, write, *, what: str, cache=None):
    """(``load(folder)``, ``{path: sha256}`` of ``paths``) for the folder of these files' contents
    and ``key`` (any JSON: what else the result depends on), written by ``write(folder)`` first
    where ``load`` returns None (missing, of another format, damaged). ``what`` names the files in
    the line printed to stderr while writing; ``cache``: another root than ``cache_root()``."""
    sources = files.fingerprints(paths)
    digest = hashlib.sha256(json.dumps([kind, key, list(sources.values())]).encode()).hexdigest()
    folder = (pathlib.Path(cache) if cache is not None else cache_root()) / kind / digest[:32]
    result = load(folder)
    if result is not None:
        return result, sources
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ValueError(f"cannot create the cache folder {folder.parent} ({err.strerror}); "
                         "set SCISCALE_CACHE to a writable folder") from None
    with open(folder.parent / f"{folder.name}.lock", "a") as lock:
        try:  # one process writes; the others wait, then read what it wrote
            fcntl.flock(lock, fcntl.LOCK_EX)
        except OSError:  # a file system without locks: each writes, the first rename wins
            pass
        if load(folder) is None:
            size = sum(pathlib.Path(path).stat().st_size for path in sources)
            print(f"sciscale: packing {len(sources)} {what} file(s) ({size / 2**20:,.1f} MiB) into {folder} once; "
                  "later runs on the same files read it from there", file=sys.stderr, flush=True)
            _write(folder, load, write, sources)
    result = load(folder)
    if result is None:
        raise ValueError(f"the cache folder {folder} written just now cannot be read back; remove it and retry")
    return result, sources


# --- what the cache holds (`sciscale cache`) -----------------------------------------------------------------

OLD_FORMATS = ("smiles-*.json",)  # files earlier versions wrote at the root, read by no version since
FORMATS: dict[str, int] = {}  # kind -> the format its packs' meta.json records in this version


def register_format(kind: str, fmt: int) -> None:
    """Packs of ``kind`` whose meta.json records another ``format`` are listed as unused (a data
    module registers the format it writes when imported)."""
    FORMATS[kind] = fmt


def _format(path: pathlib.Path):
    try:
        return json.loads((path / "meta.json").read_text()).get("format")
    except (OSError, ValueError, AttributeError):
        return None


@dataclasses.dataclass(frozen=True)
class Entry:
    """One thing under the cache root: a pack folder (``<kind>/<digest>``), a simulation
    (``weather/...``), a partial folder or a file of an earlier version."""

    path: pathlib.Path
    kind: str
    size: int                 # bytes
    written: float            # modification time (seconds since the epoch)
    sources: tuple = ()       # the files it was derived from (``sources.json``), when recorded
    unused: str = ""          # why no run reads it any more ("" where one may)
    busy: bool = False        # being written now


def _size(path: pathlib.Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())


def _locked(lock: pathlib.Path) -> bool:
    """Whether another process holds ``lock`` (a writer packing now)."""
    if not lock.exists():
        return False
    with open(lock, "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            return True
        fcntl.flock(f, fcntl.LOCK_UN)
    return False


def entries(root=None) -> list[Entry]:
    """What the cache root (``cache_root()`` unless given) holds, by kind and path. A pack whose
    recorded source files are gone, a partial folder whose writer is gone and a file or pack of an
    earlier version's format (a pack's, by ``register_format``) are marked ``unused``; a pack whose
    sources changed is not (that needs their SHA-256: a later run on the changed files packs them
    anew beside it)."""
    root = pathlib.Path(root) if root is not None else cache_root()
    out = []
    for pattern in OLD_FORMATS:
        for path in sorted(root.glob(pattern)):
            out.append(Entry(path, pattern.split("-")[0], _size(path), path.stat().st_mtime,
                             unused="an earlier version's format, read by no version since"))
    for kind in sorted(p for p in root.iterdir() if p.is_dir()) if root.is_dir() else []:
        for path in sorted(p for p in kind.iterdir() if p.is_dir()):
            sources, unused, busy = (), "", False
            if ".partial." in path.name:
                busy = not _stale(path)
                unused = "" if busy else "left by a writer that was killed"
            elif (path / "sources.json").is_file():
                try:
                    sources = tuple(json.loads((path / "sources.json").read_text()))
                except (OSError, ValueError):
                    sources = ()
                gone = [s for s in sources if not pathlib.Path(s).exists()]
                if gone:
                    unused = f"its source file {gone[0]} is gone" + (f" (and {len(gone) - 1} more)" if len(gone) > 1
                                                                     else "")
                found = _format(path) if not gone and kind.name in FORMATS else None
                if found not in (None, FORMATS.get(kind.name)):
                    unused = f"an earlier version's format ({found}; this version reads {FORMATS[kind.name]})"
                busy = _locked(kind / f"{path.name}.lock")
            out.append(Entry(path, kind.name, _size(path), path.stat().st_mtime, sources, unused, busy))
    return out


def remove(paths, root=None) -> int:
    """Remove entries of ``entries(root)`` (their folders or files, and lock files); returns the
    bytes freed. ValueError in one line, before anything is removed, for a path that is not an
    entry of the cache or is being written now."""
    root = pathlib.Path(root) if root is not None else cache_root()
    found = {e.path.resolve(): e for e in entries(root)}
    chosen = []
    for path in paths:
        path = pathlib.Path(path).expanduser().resolve()
        if path not in found:
            raise ValueError(f"{path} is not an entry of the cache {root} (see `sciscale cache`)")
        if found[path].busy:
            raise ValueError(f"{path} is being written by a running process; remove it once that has finished")
        chosen.append(found.pop(path))
    for entry in chosen:
        if entry.path.is_dir():
            shutil.rmtree(entry.path)
            lock = entry.path.parent / f"{entry.path.name}.lock"
            if lock.exists():
                lock.unlink()
        else:
            entry.path.unlink()
    return sum(e.size for e in chosen)
