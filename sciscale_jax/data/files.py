"""A user's own data files: reading them (plain or gzip-compressed text), listing the files a
setting names (comma-separated files and folders), and the SHA-256 of each file a run trained on.

A run records ``{path: sha256}`` of the files it read (``recipes.base.Data.sources``) in its
``run_config.json``, so resuming or evaluating it on a file that has changed since is refused
in one line instead of silently training or scoring on other data.
"""

from __future__ import annotations

import gzip
import hashlib
import pathlib
import zlib


def read_text(path, kind: str = "text") -> str:
    """The text of ``path`` (gunzipped when it ends in ``.gz``); ValueError in one line naming the
    path for a missing file, a folder, a broken gzip stream, or bytes that are not UTF-8 text
    ("... is not a {kind} file")."""
    path = pathlib.Path(path)
    if not path.exists():
        raise ValueError(f"{path}: no such file")
    if path.is_dir():
        raise ValueError(f"{path} is a folder, not a {kind} file")
    try:
        raw = gzip.decompress(path.read_bytes()) if path.name.endswith(".gz") else path.read_bytes()
    except (OSError, EOFError, zlib.error) as err:
        raise ValueError(f"{path} is not a readable gzip file ({err})") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(f"{path} is not a {kind} file (byte {raw[err.start]:#04x} at offset {err.start} "
                         "is not UTF-8 text)") from None
    if "\x00" in text:
        raise ValueError(f"{path} is not a {kind} file (it holds NUL bytes)")
    return text


def sha256(path) -> str:
    """Hex SHA-256 of the file's bytes as stored."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def fingerprints(paths) -> dict[str, str]:
    """``{absolute path: sha256}`` of each file: what a run records of the data it read."""
    return {str(pathlib.Path(p).resolve()): sha256(p) for p in paths}


def changed(recorded: dict[str, str], read: dict[str, str] | None = None) -> list[str]:
    """One phrase per recorded file that is missing or whose bytes differ now (empty: all unchanged).
    With ``read`` (the ``{path: sha256}`` of files just read) only the paths in both are compared,
    by the digests given: nothing is hashed again."""
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
            out.append(f"{path} changed (sha256 {digest[:12]}... when the run trained, {now[:12]}... now)")
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


def open_binary(path):
    """``path`` opened for reading bytes (gunzipped when it ends in ``.gz``); ValueError in one line
    for a missing file or a folder."""
    path = pathlib.Path(path)
    if not path.exists():
        raise ValueError(f"{path}: no such file")
    if path.is_dir():
        raise ValueError(f"{path} is a folder, not a file")
    return gzip.open(path, "rb") if path.name.endswith(".gz") else open(path, "rb")
