"""Protein corpora larger than memory: FASTA files packed once into flat token arrays on disk.

UniRef50 holds tens of millions of proteins, more residues than a host's memory holds as Python
strings or int32 arrays. ``pack_fasta`` reads FASTA files (plain or gzip) in blocks with numpy
and writes one byte per token: every protein as ``cls`` + residues + ``eos`` end to end
(``tokens``), where each begins (``offsets``), its hash bucket (``buckets``: CRC32 of the
upper-case residues mod 10,000, the train/validation split of ``protein.split_by_sequence``) and
the token counts per bucket (``counts``: the unigram of any split without reading the corpus).
``packed_proteins`` keeps the pack in a cache folder keyed by the files' SHA-256, so later runs
(``--resume``, ``sciscale eval``, another run on the same files) open it at once; the proteins a
batch draws are read from the token file when drawn, so a run holds each protein's offset,
bucket and split index and nothing per residue.

The cache folder (``sciscale_jax.data.cache``) is written by one process at a time into a
temporary folder renamed into place when complete, so a run killed while packing leaves no pack
that a later run could read half-written.
"""

from __future__ import annotations

import collections.abc
import json
import pathlib
import zlib

import numpy as np

from sciscale_jax.data import cache as data_cache
from sciscale_jax.data import files

FORMAT = 1
data_cache.register_format("proteins", FORMAT)
BUCKETS = 10_000
BLOCK = 1 << 22            # bytes read at a time (the temporaries of one block: ~40x)
_WHITESPACE = np.zeros(256, bool)
_WHITESPACE[[9, 10, 11, 12, 13, 32]] = True
_UPPER = np.arange(256, dtype=np.uint8)
_UPPER[ord("a"):ord("z") + 1] -= 32
_STOP = ord("*")


class Proteins(collections.abc.Sequence):
    """Some proteins of a pack, by index: item ``i`` is protein ``index[i]`` as int32 token ids
    (``cls`` ... ``eos``); a slice gives a list of them. What ``MLMBatches`` draws from."""

    def __init__(self, pack: "Pack", index: np.ndarray):
        self.pack, self.index = pack, np.asarray(index, np.int64)

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[k] for k in range(*i.indices(len(self)))]
        return self.pack.read(int(self.index[i]))

    def lengths(self) -> np.ndarray:
        """Tokens per protein (residues + 2)."""
        return np.diff(self.pack.offsets)[self.index]


class Pack:
    """A packed corpus: ``tokens`` uint8 [T] (an array, or the path of a file of them: each protein
    is then read from it when drawn), ``offsets`` int64 [N + 1], ``buckets`` uint16 [N], ``counts``
    int64 [BUCKETS, vocab]; ``folder``: the cache folder it is read from (None: in memory)."""

    def __init__(self, tokens, offsets, buckets, counts, folder=None):
        self.tokens, self.offsets, self.buckets, self.counts = tokens, offsets, buckets, counts
        self.folder, self._reader = folder, None

    def read(self, j: int) -> np.ndarray:
        """Protein ``j``'s int32 token ids. Read from the file, not a memory map: the pages read
        stay the operating system's cache, not this process's resident memory."""
        start, stop = int(self.offsets[j]), int(self.offsets[j + 1])
        if isinstance(self.tokens, np.ndarray):
            return self.tokens[start:stop].astype(np.int32)
        if self._reader is None:
            self._reader = data_cache.Reader(self.tokens)
        return np.frombuffer(self._reader.read(stop - start, start), np.uint8).astype(np.int32)

    def __len__(self) -> int:
        return len(self.buckets)

    def proteins(self) -> Proteins:
        """Every protein, in file order."""
        return Proteins(self, np.arange(len(self)))

    def split(self, val_fraction: float) -> tuple[Proteins, Proteins]:
        """(train, validation) in file order: bucket < val_fraction * 10,000 is held out, as
        ``protein.split_by_sequence`` splits (identical proteins never straddle the split)."""
        if not 0.0 < val_fraction < 1.0:
            raise ValueError(f"val_fraction={val_fraction} must lie in (0, 1)")
        held = self.buckets < val_fraction * BUCKETS
        return Proteins(self, np.flatnonzero(~held)), Proteins(self, np.flatnonzero(held))

    def token_counts(self, val_fraction: float, held_out: bool = False) -> np.ndarray:
        """[vocab] token counts of one side of ``split(val_fraction)``, from the per-bucket counts."""
        held = np.arange(BUCKETS) < val_fraction * BUCKETS
        return self.counts[held if held_out else ~held].sum(axis=0)


class _Sink:
    """Where packed arrays go: lists in memory, or raw files in ``folder``."""

    NAMES = {"tokens": np.uint8, "offsets": np.int64, "buckets": np.uint16}

    def __init__(self, folder=None):
        self.folder, self.parts = folder, {name: [] for name in self.NAMES}
        self.handles = {n: open(folder / f"{n}.bin", "wb") for n in self.NAMES} if folder else None

    def add(self, name, array):
        array = np.ascontiguousarray(array, self.NAMES[name])
        if self.handles:
            self.handles[name].write(array.tobytes())
        else:
            self.parts[name].append(array)

    def close(self):
        for h in (self.handles or {}).values():
            h.close()

    def arrays(self):
        if self.handles:
            return {"tokens": self.folder / "tokens.bin", "offsets": _map(self.folder / "offsets.bin", np.int64),
                    "buckets": _map(self.folder / "buckets.bin", np.uint16)}
        return {n: np.concatenate(self.parts[n]) if self.parts[n] else np.zeros(0, dt)
                for n, dt in self.NAMES.items()}


def _map(path, dtype):
    return np.memmap(path, dtype, mode="r") if path.stat().st_size else np.zeros(0, dtype)


def line_blocks(path, kind: str = "FASTA text"):
    """(bytes ending in a newline, number of lines before them) of ``path`` (``kind`` of text, for
    the errors), about ``BLOCK`` at a time, with CRLF and CR line ends read as LF (as ``str.splitlines`` reads them); one-line
    ValueError for a broken gzip stream, NUL bytes or bytes that are not UTF-8."""
    reader = files.open_binary(path, kind)
    carry, lines, offset = b"", 0, 0
    try:
        with reader as f:
            while True:
                raw = f.read(BLOCK)
                data = carry + raw
                cut = len(data) if not raw else max(data.rfind(b"\n"), data.rfind(b"\r")) + 1
                if cut:
                    block = data[:cut]
                    files.check_text(path, block, kind, offset)
                    if b"\r" in block:
                        block = block.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
                    if not raw and not block.endswith(b"\n"):
                        block += b"\n"
                    yield block, lines
                    lines += block.count(b"\n")
                    offset += cut
                if not raw:
                    return
                carry = data[cut:]
    except (OSError, EOFError, zlib.error) as err:
        if pathlib.Path(path).name.endswith(".gz"):
            raise ValueError(f"{path} is not a readable gzip file ({err})") from None
        raise ValueError(f"{path} could not be read ({err})") from None


def _edges(n: int, starts, ends) -> np.ndarray:
    """[n] bool: inside some half-open range ``[starts[k], ends[k])`` (ranges do not overlap)."""
    return np.cumsum(np.bincount(starts, minlength=n + 1) - np.bincount(ends, minlength=n + 1))[:n] > 0


def _residue_bytes(a: np.ndarray):
    """(upper-case sequence bytes of a block, where each header's record starts in them, and the
    block position of the first sequence byte or -1). A header is a line whose first byte other
    than white space is ``>``."""
    visible = ~_WHITESPACE[a]
    nl = np.flatnonzero(a == 10)
    starts = np.concatenate([[0], nl[:-1] + 1])
    shown = np.flatnonzero(visible)
    if not len(shown):
        return np.zeros(0, np.uint8), np.zeros(0, np.int64), -1
    first = np.searchsorted(shown, starts)  # each line's first visible byte (if before its end)
    at = shown[np.minimum(first, len(shown) - 1)]
    header = (first < len(shown)) & (at < nl) & (a[at] == ord(">"))
    kept = np.flatnonzero(~_edges(len(a), starts[header], nl[header]) & visible)
    return _UPPER[a[kept]], np.searchsorted(kept, starts[header]), (int(kept[0]) if len(kept) else -1)


def _emit(raw: np.ndarray, starts: np.ndarray, sink: _Sink, table: np.ndarray, ids, counts, state) -> None:
    """Records ``raw[starts[k]:starts[k + 1]]`` (the last ends at ``len(raw)``): trailing stops
    stripped, empty ones dropped, the rest hashed, tokenized and written."""
    starts = np.asarray(starts, np.int64)
    if not len(starts) or not len(raw):
        return
    ends = np.append(starts[1:], len(raw))
    while True:
        stop = (ends > starts) & (raw[np.maximum(ends - 1, 0)] == _STOP)
        if not stop.any():
            break
        ends[stop] -= 1
    full = ends > starts
    starts, ends = starts[full], ends[full]
    if not len(starts):
        return
    view = memoryview(raw)
    buckets = np.fromiter((zlib.crc32(view[s:e]) % BUCKETS for s, e in zip(starts.tolist(), ends.tolist())),
                          np.int64, len(starts))
    lengths = ends - starts + 2
    out_starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    out = np.empty(int(lengths.sum()), np.uint8)
    out[out_starts] = ids[0]
    out[out_starts + lengths - 1] = ids[1]
    gapless = starts[0] == 0 and ends[-1] == len(raw) and np.array_equal(ends[:-1], starts[1:])
    residues = raw if gapless else raw[_edges(len(raw), starts, ends)]  # stripped stops: gaps
    is_residue = np.ones(len(out), bool)
    is_residue[out_starts] = is_residue[out_starts + lengths - 1] = False
    out[is_residue] = table[residues]
    sink.add("tokens", out)
    sink.add("offsets", state["tokens"] + out_starts)
    sink.add("buckets", buckets)
    vocab = counts.shape[1]
    counts += np.bincount(np.repeat(buckets, lengths) * vocab + out, minlength=counts.size).reshape(counts.shape)
    state["tokens"] += len(out)


def _table(tokenizer) -> np.ndarray:
    """[256] token id of each byte (upper case); symbols outside the alphabet read as X."""
    if tokenizer.vocab_size > 256:
        raise ValueError(f"a pack holds one byte per token; vocab_size={tokenizer.vocab_size} > 256")
    x = tokenizer.encode("X")[0]
    table = np.full(256, x, np.uint8)
    for code in range(128):
        ids = tokenizer._lookup[code]
        table[code] = ids if ids >= 0 else x
    return table


def pack_fasta(paths, tokenizer, folder=None) -> Pack:
    """Pack the proteins of FASTA files ``paths`` (in order) with ``tokenizer`` (symbols outside its
    alphabet read as X), in memory or as raw files in ``folder``. One-line ValueError naming the
    file for a file that is not FASTA text or holds no proteins (as ``protein.read_fasta``)."""
    table, ids = _table(tokenizer), (tokenizer.cls_id, tokenizer.eos_id)
    sink, state = _Sink(folder and pathlib.Path(folder)), {"tokens": 0}
    counts = np.zeros((BUCKETS, tokenizer.vocab_size), np.int64)
    try:
        for path in map(pathlib.Path, paths):
            found, carry = state["tokens"], None  # carry: the bytes of the record still open
            for block, lines in line_blocks(path):
                a = np.frombuffer(block, np.uint8)
                raw, heads, first = _residue_bytes(a)
                if carry is None and len(raw) and (not len(heads) or heads[0] > 0):
                    line = lines + int(np.count_nonzero(a[:first] == 10)) + 1
                    text = block[first:].split(b"\n", 1)[0].decode().strip()
                    raise ValueError(f"{path} is not a FASTA file: line {line} comes before any '>' header "
                                     f"({text[:40]!r})")
                if carry is not None:
                    raw, heads = np.concatenate([carry, raw]), np.concatenate([[0], heads + len(carry)])
                if len(heads):
                    _emit(raw[:heads[-1]], heads[:-1], sink, table, ids, counts, state)
                    carry = raw[heads[-1]:]
            if carry is not None:
                _emit(carry, [0], sink, table, ids, counts, state)
            if state["tokens"] == found:
                raise ValueError(f"{path} holds no protein sequences (empty, or FASTA headers without sequences)")
        sink.add("offsets", [state["tokens"]])
    finally:
        sink.close()  # on an error too (the partial folder is then removed)
    arrays = sink.arrays()
    return Pack(arrays["tokens"], arrays["offsets"], arrays["buckets"], counts)


def _load(folder: pathlib.Path, tokens: tuple, vocab: int):
    """The pack in ``folder``, or None where it is missing, of another format or damaged."""
    try:
        meta = json.loads((folder / "meta.json").read_text())
        if meta.get("format") != FORMAT or meta.get("tokens") != list(tokens):
            return None
        n, t = int(meta["proteins"]), int(meta["token_count"])
        sizes = {"tokens.bin": t, "offsets.bin": 8 * (n + 1), "buckets.bin": 2 * n}
        if any((folder / name).stat().st_size != size for name, size in sizes.items()):
            return None
        counts = np.load(folder / "counts.npy")
        if counts.shape != (BUCKETS, vocab) or int(counts.sum()) != t:
            return None
    except (OSError, EOFError, ValueError, KeyError, TypeError):  # EOFError: an empty .npy file
        return None
    arrays = {"tokens": folder / "tokens.bin", "offsets": _map(folder / "offsets.bin", np.int64),
              "buckets": _map(folder / "buckets.bin", np.uint16)}
    if n and (arrays["offsets"][0] != 0 or arrays["offsets"][-1] != t):
        return None
    return Pack(arrays["tokens"], arrays["offsets"], arrays["buckets"], counts, folder)


def packed_proteins(paths, tokenizer, cache=None) -> tuple[Pack, dict[str, str]]:
    """The pack of FASTA files ``paths`` and ``{path: sha256}`` of each: opened from the cache
    folder (``data.cache``: ``cache_root()`` unless ``cache`` is given) when these files' contents
    were packed before, else packed into it first (by one process at a time). The key is the
    files' SHA-256 in order, the format and the tokenizer's tokens, so a changed file is packed
    anew and a renamed one is not."""
    tokens = list(tokenizer.tokens)

    def write(folder):
        pack = pack_fasta(paths, tokenizer, folder)
        np.save(folder / "counts.npy", pack.counts)
        meta = {"format": FORMAT, "tokens": tokens, "proteins": len(pack), "token_count": int(pack.offsets[-1])}
        (folder / "meta.json").write_text(json.dumps(meta, indent=1))

    return data_cache.cached("proteins", paths, [FORMAT, tokens], lambda folder: _load(folder, tokens, len(tokens)),
                            write, what="FASTA", cache=cache)
