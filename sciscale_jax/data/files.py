"""A user's own data files: reading them (plain or gzip-compressed text), listing the files a
setting names (comma-separated files and folders), and the SHA-256 of each file a run trained on.

A run records ``{path: sha256}`` of the files it read (``recipes.base.Data.sources``) in its
``run_config.json``, so resuming or evaluating it on a file that has changed since is refused
in one line instead of silently training or scoring on other data.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import pathlib
import time
import zlib


def read_text(path, kind: str = "text") -> str:
    """The text of ``path`` (gunzipped when it ends in ``.gz``); ValueError in one line naming the
    path for a missing file, a folder, a broken gzip stream, or bytes that are not UTF-8 text
    ("... is not a {kind} file")."""
    try:
        with open_binary(path, kind) as f:
            raw = f.read()
    except (OSError, EOFError, zlib.error) as err:
        raise ValueError(f"{path} is not a readable gzip file ({err})") from None
    return check_text(path, raw, kind)


def check_text(path, raw: bytes, kind: str, offset: int = 0) -> str:
    """``raw`` (the bytes of ``path`` from ``offset`` on) as UTF-8 text; ValueError in one line
    naming the path and the byte for bytes that are not UTF-8, or for NUL bytes ("... is not a
    {kind} file")."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(f"{path} is not a {kind} file (byte {raw[err.start]:#04x} at offset "
                         f"{offset + err.start} is not UTF-8 text)") from None
    if "\x00" in text:
        raise ValueError(f"{path} is not a {kind} file (it holds NUL bytes)")
    return text


_DIGESTS: dict = {}  # (device, inode, size, mtime) of a file hashed by this process -> its SHA-256
RACY_SECONDS = 2.0   # a file modified this recently may change again within its timestamp's granularity


def sha256(path) -> str:
    """Hex SHA-256 of the file's bytes as stored. A file hashed before by this process and not
    modified since (same device, inode, size and modification time) is not read again, unless it
    was modified in the ``RACY_SECONDS`` before it was hashed (git's rule for "racy" files: a
    rewrite within the timestamp's granularity would keep the time). Checking a resumed run's
    recorded files and then reading them hashes each file once."""
    before = os.stat(path)
    key = (before.st_dev, before.st_ino, before.st_size, before.st_mtime_ns)
    if key in _DIGESTS:
        return _DIGESTS[key]
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    after = os.stat(path)
    settled = time.time_ns() - before.st_mtime_ns > RACY_SECONDS * 1e9
    if settled and key == (after.st_dev, after.st_ino, after.st_size, after.st_mtime_ns):
        _DIGESTS[key] = digest.hexdigest()
    return digest.hexdigest()


def fingerprints(paths) -> dict[str, str]:
    """``{absolute path: sha256}`` of each file: what a run records of the data it read."""
    return {str(pathlib.Path(p).resolve()): sha256(p) for p in paths}


def changed(recorded: dict[str, str], read: dict[str, str] | None = None, *, digits: int = 12) -> list[str]:
    """One phrase per recorded file that is missing or whose bytes differ now (empty: all unchanged),
    showing ``digits`` hex digits of each digest. With ``read`` (the ``{path: sha256}`` of files just
    read) only the paths in both are compared, by the digests given: nothing is hashed again."""
    out = []
    for path, digest in sorted(recorded.items()):
        if read is not None:
            if path not in read:
                continue
            now = read[path]
        elif not pathlib.Path(path).is_file():
            out.append(f"{path} is gone")
            continue
        else:
            now = sha256(path)
        if now != digest:
            out.append(f"{path} changed (sha256 {digest[:digits]}... when the run trained, {now[:digits]}... now)")
    return out


def expand(spec: str, suffixes: tuple[str, ...], what: str) -> list[pathlib.Path]:
    """The files a setting names: comma-separated files and folders (a folder: its files ending in
    one of ``suffixes``, sorted by name). ValueError in one line for a path that does not exist or a
    folder without such files."""
    out = []
    for part in (p.strip() for p in spec.split(",")):
        if not part:
            continue
        path = pathlib.Path(part).expanduser()
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if p.is_file() and p.name.lower().endswith(suffixes))
            if not found:
                raise ValueError(f"{what} {path}: the folder holds no {'/'.join(suffixes)} files")
            out += found
        elif path.exists():
            out.append(path)
        else:
            raise ValueError(f"{what} {path}: no such file or folder")
    if not out:
        raise ValueError(f"{what}: no files given")
    return out


def open_binary(path, kind: str = "text"):
    """``path`` opened for reading bytes (gunzipped when it ends in ``.gz``); ValueError in one line
    for a missing file or a folder ("... is a folder, not a {kind} file")."""
    path = pathlib.Path(path)
    if not path.exists():
        raise ValueError(f"{path}: no such file")
    if path.is_dir():
        raise ValueError(f"{path} is a folder, not a {kind} file")
    return gzip.open(path, "rb") if path.name.endswith(".gz") else open(path, "rb")
