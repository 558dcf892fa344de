"""SMILES corpora larger than memory: curated in parallel, packed once into flat token arrays on disk.

Chemical language models pretrain on tens to hundreds of millions of molecules (PubChem, ZINC,
Enamine REAL), more than a host holds as Python strings, and RDKit curates about a thousand
molecules a second on one core. ``pack_smiles`` streams the records of SMILES files (plain or
gzip, in blocks), curates them in worker processes (``curate``: largest fragment, neutralised,
organic elements; or RDKit's canonical form alone), writes each surviving molecule in the chosen
form (aromatic or Kekulé canonical SMILES) as atom-level tokens, two bytes per token, end to end
(``tokens``: ids into the pack's own token list ``vocab``, in order of first appearance), where
each begins (``offsets``), its split bucket (``buckets``: CRC32 of the aromatic canonical SMILES
mod 10,000, ``smiles.split_by_hash``'s key), a 64-bit BLAKE2b hash of the aromatic canonical
SMILES (``hashes``: novelty of generated molecules without the training strings) and the token
counts per bucket (``counts``: any split's vocabulary without reading the tokens again).

Molecules are deduplicated on that hash in file order (the first occurrence stays, as before);
two distinct molecules with the same 64-bit hash (about one pair in 10^5 corpora of 10^8
molecules) would count as one. ``limit`` keeps the first N distinct molecules and stops reading
once it has them. The result is the same for any number of workers: chunks are curated in
parallel and taken in order.

``packed_smiles`` keeps the pack in a cache folder (``data.cache``) keyed by the files' SHA-256,
the curation, the form, the limit and the RDKit version (canonical SMILES depend on it), written
into a temporary folder renamed into place when complete; a run holds per molecule its offset,
bucket and hash (18 bytes) and reads the tokens of the molecules a batch draws when it draws them.
"""

from __future__ import annotations

import collections.abc
import hashlib
import importlib.metadata
import itertools
import json
import os
import pathlib
import pickle
import subprocess
import sys
import tempfile
import zlib

import numpy as np

from sciscale_jax.data import cache as data_cache
from sciscale_jax.data import files
from sciscale_jax.data import smiles as sm

FORMAT = 1
data_cache.register_format("smiles", FORMAT)
BUCKETS = 10_000
CHUNK = 2_000          # records a worker curates at a time
MAX_TOKENS = 1 << 16   # distinct tokens a pack holds (two bytes per token)
BLOCK = 1 << 20        # molecules handled at a time when compacting and counting


def smiles_hash(smiles: str) -> int:
    """64-bit BLAKE2b hash of a SMILES string (the key molecules are deduplicated and looked up by)."""
    return int.from_bytes(hashlib.blake2b(smiles.encode(), digest_size=8).digest(), "little")


def bucket(smiles: str) -> int:
    """Split bucket of an aromatic canonical SMILES: CRC32 mod 10,000 (``smiles.split_by_hash``'s)."""
    return zlib.crc32(smiles.encode()) % BUCKETS


def curate_chunk(records, curated: bool, form: str) -> tuple:
    """Curate ``records`` (SMILES strings): (the chunk's tokens in order of first appearance, token
    ids [uint16] of every kept molecule end to end, tokens per molecule, hashes, buckets, how many
    records were left out). Run in a worker process."""
    local: dict[str, int] = {}
    ids, lengths, hashes, buckets, refused = [], [], [], [], 0
    for smi in records:
        can = sm.curate(smi) if curated else sm.canonical(smi)
        if not can:
            refused += 1
            continue
        tokens = sm.tokenize(can if form == "aromatic" else sm.to_form(can, form))
        ids.extend(local.setdefault(t, len(local)) for t in tokens)
        lengths.append(len(tokens))
        hashes.append(smiles_hash(can))
        buckets.append(bucket(can))
    return (list(local), np.asarray(ids, np.uint32), np.asarray(lengths, np.int64), np.asarray(hashes, np.uint64),
            np.asarray(buckets, np.uint16), refused)


def _chunks(paths):
    chunk = []
    for path in paths:
        for record in sm.smiles_records(path):
            chunk.append(record)
            if len(chunk) == CHUNK:
                yield chunk
                chunk = []
    if chunk:
        yield chunk


def default_workers() -> int:
    """Worker processes for curation: ``$SCISCALE_DATA_WORKERS`` if set, else the CPUs this process
    may use, at most 32."""
    env = os.environ.get("SCISCALE_DATA_WORKERS", "").strip()
    if env:
        if not env.isdigit() or int(env) < 1:
            raise ValueError(f"SCISCALE_DATA_WORKERS={env!r} must be a positive integer")
        return int(env)
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cpus = os.cpu_count() or 1
    return max(1, min(32, cpus))


def _serve() -> None:
    """A curation worker: reads pickled ``(records, curated, form)`` from stdin until it closes and
    answers each with ``("ok", curate_chunk(...))`` or ``("error", message)`` on stdout."""
    stdin, stdout = sys.stdin.buffer, sys.stdout.buffer
    while True:
        try:
            job = pickle.load(stdin)
        except EOFError:
            return
        try:
            reply = ("ok", curate_chunk(*job))
        except Exception as err:  # noqa: BLE001  (sent back and raised in the parent)
            reply = ("error", f"{type(err).__name__}: {err}")
        pickle.dump(reply, stdout, protocol=pickle.HIGHEST_PROTOCOL)
        stdout.flush()


class _Workers:
    """``count`` fresh Python processes running ``_serve`` (started with ``-c``: no fork of a process
    that may run JAX's threads, and the caller's main module is never imported again), each given
    one chunk at a time."""

    def __init__(self, count: int):
        env = dict(os.environ)
        root = str(pathlib.Path(__file__).resolve().parents[2])  # where this package is imported from
        env["PYTHONPATH"] = os.pathsep.join([root] + [p for p in [env.get("PYTHONPATH")] if p])
        code = "from sciscale_jax.data.smiles_pack import _serve; _serve()"
        self.procs = [subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                       env=env) for _ in range(count)]
        self.busy = [False] * count  # a chunk sent and its answer not read yet

    def _ended(self, k: int, err) -> RuntimeError:
        return RuntimeError(f"a SMILES curation worker ended unexpectedly (exit code {self.procs[k].poll()}): "
                            f"{type(err).__name__}")

    def send(self, k: int, job) -> None:
        try:
            pickle.dump(job, self.procs[k].stdin, protocol=pickle.HIGHEST_PROTOCOL)
            self.procs[k].stdin.flush()
        except OSError as err:  # its pipe closed: the worker is gone
            raise self._ended(k, err) from None
        self.busy[k] = True

    def receive(self, k: int):
        try:
            status, value = pickle.load(self.procs[k].stdout)
        except (EOFError, pickle.UnpicklingError) as err:
            raise self._ended(k, err) from None
        self.busy[k] = False
        if status != "ok":
            raise ValueError(f"curating SMILES failed in a worker: {value}")
        return value

    def close(self) -> None:
        """Workers still curating a chunk nobody will read (the caller stopped early) are killed;
        the others end when their input closes."""
        for proc, busy in zip(self.procs, self.busy):
            if busy:
                proc.kill()
            try:
                proc.stdin.close()
            except OSError:
                pass
        for proc in self.procs:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            proc.stdout.close()


def _curated(chunks, workers: int, curated: bool, form: str):
    """``curate_chunk`` of each chunk, in order: in this process for one worker or one chunk, else
    chunk i in worker i mod ``workers`` (``_Workers``), one chunk in flight per worker, so memory
    does not grow with the corpus and the result does not depend on the number of workers."""
    chunks = iter(chunks)
    head = [c for c in (next(chunks, None), next(chunks, None)) if c is not None]
    if len(head) < 2 or workers <= 1:
        for chunk in itertools.chain(head, chunks):
            yield curate_chunk(chunk, curated, form)
        return
    pool = _Workers(workers)
    try:
        queue, sent = itertools.chain(head, chunks), 0
        for k in range(workers):
            chunk = next(queue, None)
            if chunk is None:
                break
            pool.send(k, (chunk, curated, form))
            sent += 1
        for i in itertools.count():
            if i == sent:
                return
            result = pool.receive(i % workers)
            chunk = next(queue, None)
            if chunk is not None:  # the worker that just answered takes the next chunk
                pool.send(i % workers, (chunk, curated, form))
                sent += 1
            yield result
    finally:  # also when the caller stops early (limit reached) or a file is refused
        pool.close()


def _spans(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """The positions ``starts[i] .. starts[i] + lengths[i] - 1`` of every span, one after another."""
    before = np.concatenate([[0], np.cumsum(lengths)[:-1]])  # where each span begins in the result
    return np.repeat(starts - before, lengths) + np.arange(int(np.sum(lengths)))


def pack_smiles(paths, folder, *, curated: bool = True, form: str = "aromatic", limit: int = 0,
                workers: int = 1) -> dict:
    """Pack the molecules of SMILES files ``paths`` (in order) into ``folder``; returns the pack's
    ``meta.json``. One-line ValueError naming the file for a file that is not SMILES text."""
    folder = pathlib.Path(folder)
    vocab: dict[str, int] = {}
    hashes, buckets, lengths = [], [], []
    read = refused = total = checked = 0
    with open(folder / "raw.bin", "wb") as raw:
        for local, ids, lens, hs, bs, left_out in _curated(_chunks(paths), workers, curated, form):
            table = np.array([vocab.setdefault(t, len(vocab)) for t in local] or [0], np.uint32)
            if len(vocab) > MAX_TOKENS:
                raise ValueError(f"the corpus holds more than {MAX_TOKENS:,} distinct tokens; a pack stores two "
                                 "bytes per token (curate it, or split it)")
            raw.write(table[ids].astype(np.uint16).tobytes())
            hashes.append(hs)
            buckets.append(bs)
            lengths.append(lens)
            read += len(lens) + left_out
            refused += left_out
            total += len(lens)
            if limit and total >= limit and total >= checked * 1.05:  # enough distinct molecules yet?
                checked = total
                if len(np.unique(np.concatenate(hashes))) >= limit:
                    break
    h = np.concatenate(hashes) if hashes else np.zeros(0, np.uint64)
    b = np.concatenate(buckets) if buckets else np.zeros(0, np.uint16)
    n = np.concatenate(lengths) if lengths else np.zeros(0, np.int64)
    kept = np.sort(np.unique(h, return_index=True)[1])  # first occurrences, in file order
    distinct = len(kept)
    if limit:
        kept = kept[:limit]
    starts = np.concatenate([[0], np.cumsum(n)])
    offsets = np.concatenate([[0], np.cumsum(n[kept])]).astype(np.int64)
    counts = np.zeros((BUCKETS, max(len(vocab), 1)), np.int64)
    source = np.memmap(folder / "raw.bin", np.uint16, mode="r") if starts[-1] else np.zeros(0, np.uint16)
    with open(folder / "tokens.bin", "wb") as out:
        for at in range(0, len(kept), BLOCK):  # gather the kept molecules' tokens, block by block
            k = kept[at:at + BLOCK]
            lens = n[k]
            tokens = np.asarray(source[_spans(starts[k], lens)])
            out.write(tokens.tobytes())
            counts += np.bincount(np.repeat(b[k].astype(np.int64), lens) * counts.shape[1] + tokens,
                                  minlength=counts.size).reshape(counts.shape)
    del source
    (folder / "raw.bin").unlink()
    offsets.tofile(folder / "offsets.bin")
    b[kept].tofile(folder / "buckets.bin")
    h[kept].tofile(folder / "hashes.bin")
    np.save(folder / "counts.npy", counts[:, :len(vocab)])
    meta = {"format": FORMAT, "vocab": list(vocab), "molecules": int(len(kept)), "token_count": int(offsets[-1]),
            "records_read": int(read), "left_out": int(refused), "duplicates": int(total - distinct),
            "form": form, "curated": curated, "limit": limit}
    (folder / "meta.json").write_text(json.dumps(meta, indent=1))
    return meta


class SmilesPack:
    """A packed SMILES corpus (``pack_smiles``): ``offsets`` int64 [N + 1], ``buckets`` uint16 [N],
    ``hashes`` uint64 [N] (memory-mapped), ``vocab`` (the pack's tokens by id), ``counts`` int64
    [BUCKETS, len(vocab)]; molecule ``j``'s tokens are read from ``folder/tokens.bin`` when asked."""

    def __init__(self, folder, meta: dict, offsets, buckets, hashes):
        self.folder, self.meta = pathlib.Path(folder), meta
        self.vocab = tuple(meta["vocab"])
        self.offsets, self.buckets, self.hashes = offsets, buckets, hashes
        self._reader, self._counts = data_cache.Reader(self.folder / "tokens.bin"), None

    def __len__(self) -> int:
        return len(self.buckets)

    def read(self, j: int) -> np.ndarray:
        """Molecule ``j``'s token ids (into ``vocab``), uint16."""
        start, stop = int(self.offsets[j]), int(self.offsets[j + 1])
        return np.frombuffer(self._reader.read(2 * (stop - start), 2 * start), np.uint16)

    def smiles(self, j: int) -> str:
        """Molecule ``j`` as the SMILES string it was packed from."""
        return "".join(self.vocab[i] for i in self.read(j).tolist())

    def lengths(self) -> np.ndarray:
        """Tokens per molecule (without bos and eos)."""
        return np.diff(self.offsets)

    @property
    def counts(self) -> np.ndarray:
        if self._counts is None:
            self._counts = np.load(self.folder / "counts.npy")
        return self._counts

    def token_counts(self, index) -> np.ndarray:
        """[len(vocab)] token counts over the molecules ``index`` (an int array)."""
        index = np.asarray(index, np.int64)
        counts = np.zeros(len(self.vocab), np.int64)
        tokens = np.memmap(self.folder / "tokens.bin", np.uint16, mode="r") if self.offsets[-1] else None
        for at in range(0, len(index), BLOCK):
            k = index[at:at + BLOCK]
            counts += np.bincount(np.asarray(tokens[_spans(self.offsets[k], self.offsets[k + 1] - self.offsets[k])]),
                                  minlength=len(self.vocab))
        return counts

    def split(self, val_fraction: float, stop: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(train, validation) molecule indices among the first ``stop`` (None: all), in file order:
        bucket < val_fraction * 10,000 is held out (``smiles.split_by_hash``)."""
        if not 0.0 < val_fraction < 1.0:
            raise ValueError(f"val_fraction={val_fraction} must lie in (0, 1)")
        held = np.asarray(self.buckets[:stop]) < val_fraction * BUCKETS
        return np.flatnonzero(~held), np.flatnonzero(held)

    def train_counts(self, val_fraction: float, stop: int | None = None) -> np.ndarray:
        """[len(vocab)] token counts of the training side of ``split(val_fraction, stop)``: from the
        per-bucket counts for the whole pack, else counted over those molecules."""
        if stop is None or stop >= len(self):
            return self.counts[np.arange(BUCKETS) >= val_fraction * BUCKETS].sum(axis=0)
        return self.token_counts(self.split(val_fraction, stop)[0])


def _load(folder: pathlib.Path, key: list):
    """The pack in ``folder``, or None where it is missing, of another format or damaged."""
    try:
        meta = json.loads((folder / "meta.json").read_text())
        if meta.get("format") != FORMAT or [meta.get(k) for k in ("form", "curated", "limit")] != key[2:5]:
            return None
        n, t, v = int(meta["molecules"]), int(meta["token_count"]), len(meta["vocab"])
        sizes = {"tokens.bin": 2 * t, "offsets.bin": 8 * (n + 1), "buckets.bin": 2 * n, "hashes.bin": 8 * n}
        if any((folder / name).stat().st_size != size for name, size in sizes.items()):
            return None
        counts = np.load(folder / "counts.npy", mmap_mode="r")
        if counts.shape != (BUCKETS, v) or int(np.asarray(counts).sum()) != t:
            return None
    except (OSError, EOFError, ValueError, KeyError, TypeError):  # EOFError: an empty .npy file
        return None
    offsets = np.fromfile(folder / "offsets.bin", np.int64)
    if offsets[0] != 0 or offsets[-1] != t or (n and np.any(np.diff(offsets) < 1)):
        return None
    mapped = lambda name, dtype: np.memmap(folder / name, dtype, mode="r") if n else np.zeros(0, dtype)  # noqa: E731
    return SmilesPack(folder, meta, offsets, mapped("buckets.bin", np.uint16), mapped("hashes.bin", np.uint64))


def packed_smiles(paths, *, curated: bool = True, form: str = "aromatic", limit: int = 0, workers: int | None = None,
                  cache=None, use_cache: bool = True) -> tuple[SmilesPack, dict[str, str]]:
    """The pack of SMILES files ``paths`` and ``{path: sha256}`` of each: opened from the cache
    folder when these files' contents were packed before with these settings, else packed into it
    first (by one process at a time; ``workers`` processes curate, default ``default_workers()``).
    ``use_cache=False`` packs into a temporary folder removed when the pack is collected."""
    if form not in sm.SMILES_FORMS:
        raise ValueError(f"form={form!r} must be one of {sm.SMILES_FORMS}")
    if not isinstance(limit, int) or isinstance(limit, bool) or limit < 0:
        raise ValueError(f"limit={limit!r} must be a non-negative integer")
    workers = default_workers() if workers is None else workers
    key = [FORMAT, importlib.metadata.version("rdkit"), form, curated, limit]

    def write(folder):
        pack_smiles(paths, folder, curated=curated, form=form, limit=limit, workers=workers)

    if not use_cache:
        tmp = tempfile.TemporaryDirectory(prefix="smiles-pack-")
        write(pathlib.Path(tmp.name))
        pack = _load(pathlib.Path(tmp.name), key)
        pack._tmp = tmp  # removed with the pack
        return pack, files.fingerprints(paths)
    return data_cache.cached("smiles", paths, key, lambda folder: _load(folder, key), write, what="SMILES",
                             cache=cache)


class Molecules(collections.abc.Sequence):
    """Some molecules of a pack as a tokenizer's ids: item ``i`` is molecule ``index[i]`` as int32
    ids ``bos`` ... ``eos`` (pack tokens mapped by ``table``, unknown ones to unk); a slice gives a
    list of them. What ``CausalLMBatches`` draws from."""

    def __init__(self, pack: SmilesPack, index, table: np.ndarray, bos: int, eos: int):
        self.pack, self.index, self.table = pack, np.asarray(index, np.int64), table
        self.bos, self.eos = bos, eos

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[k] for k in range(*i.indices(len(self)))]
        ids = self.table[self.pack.read(int(self.index[i]))]
        return np.concatenate([[self.bos], ids, [self.eos]]).astype(np.int32)

    def lengths(self) -> np.ndarray:
        """Ids per molecule (tokens + bos + eos)."""
        return (self.pack.offsets[self.index + 1] - self.pack.offsets[self.index]) + 2

    def smiles(self) -> list[str]:
        return [self.pack.smiles(int(j)) for j in self.index]

    def hashes(self) -> np.ndarray:
        """Sorted hashes of these molecules' aromatic canonical SMILES (``smiles_hash``)."""
        return np.sort(np.asarray(self.pack.hashes)[self.index])
