"""Multiple sequence alignments for the Evoformer: real alignments shipped in PyPI wheels,
AlphaFold's masked-MSA corruption, query-centred crops and the column-profile baseline.

Alignments: the Stockholm files in pyhmmer's test data (LuxC, the KR family found by
jackhmmer) and FAMSA's test alignments shipped in ``pyfamsa`` of the adenovirus fiber (242
sequences) and hemopexin (4,188 sequences) families. They are located with
``importlib.util.find_spec`` (no compiled extension is imported). In HMMER's Stockholm output,
columns holding only lower-case residues and '.' are insert states and are dropped, so every
row runs over the same match columns; otherwise '.' and '-' are gaps.

Tokens follow AlphaFold's ``HHBLITS_AA_TO_ID`` order: 20 amino acids (``ARNDCQEGHILKMFPSTWYV``),
X (unknown), the gap '-', and a mask token: 23 classes, the output size of AlphaFold's
masked-MSA head. ``MSABatches`` draws, for each example of a step, an alignment, a query row
(columns where the query has a gap are dropped, as in a query-centred A3M), a window of
``num_res`` residues and ``num_seq - 1`` other rows, then corrupts 15% of the MSA positions as
AlphaFold's ``make_masked_msa`` does: of the selected positions 70% become the mask token, 10%
a uniformly drawn amino acid, 10% a residue drawn from the column's profile, 10% stay. Everything
is a pure function of (seed, step).

The baseline is the per-column profile of the rows that are not selected (pseudocount 1 per
class): a model that beats it at the positions replaced by the mask token has used more than
conservation (e.g. which other rows a sequence resembles).
"""

from __future__ import annotations

import collections.abc
import importlib.util
import json
import pathlib
import zlib

import numpy as np

from sciscale_jax.data import cache as data_cache
from sciscale_jax.data import files
from sciscale_jax.data.rows import check_rows

AMINO = "ARNDCQEGHILKMFPSTWYV"
UNKNOWN_ID, GAP_ID, MASK_ID = 20, 21, 22
NUM_CLASSES = 23                     # AlphaFold's masked-MSA head: 20 aa, X, gap, mask
_LOOKUP = np.full(128, UNKNOWN_ID, np.int8)
for _i, _c in enumerate(AMINO):
    _LOOKUP[ord(_c)] = _LOOKUP[ord(_c.lower())] = _i
_LOOKUP[ord("-")] = _LOOKUP[ord(".")] = GAP_ID

PYHMMER_ALIGNMENTS = ("msa/LuxC.sto", "jackhmmer/KR-6.sto", "jackhmmer/p12748-3.sto")
PYFAMSA_ALIGNMENTS = ("adeno_fiber.upgma.afa", "hemopexin.medoid-upgma.afa")


def _package_data(package: str, extra: str) -> pathlib.Path:
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise ImportError(f"the alignments need the {package!r} package: pip install -e \".[{extra}]\"")
    return pathlib.Path(spec.origin).parent / "tests" / "data"


ALIGNMENT_SUFFIXES = tuple(s + gz for gz in ("", ".gz") for s in (".sto", ".stk", ".afa", ".fasta", ".fa", ".a3m"))


def read_alignment(path) -> np.ndarray:
    """int8 tokens [rows, columns] of a Stockholm (.sto), aligned FASTA (.afa/.fasta) or A3M
    (.a3m) file, each possibly gzip-compressed. In A3M (HHblits, ColabFold), and in a FASTA file
    whose rows differ in length, lower-case letters are insertions relative to the query and
    '.' their gaps: they are dropped, so every row runs over the query's columns."""
    path = pathlib.Path(path)
    text = files.read_text(path, "text alignment")
    rows: dict[str, list[str]] = {}
    if text.startswith("# STOCKHOLM"):
        blocks = [b for b in text.split("\n//") if b.strip()]
        block = max(blocks, key=lambda b: sum(1 for ln in b.splitlines() if ln.strip() and not ln.startswith("#")))
        for line in block.splitlines():  # a file of several alignments (jackhmmer rounds): the largest
            if not line.strip() or line.startswith("#") or line.startswith("//"):
                continue
            name, _, seq = line.partition(" ")
            rows.setdefault(name, []).append(seq.strip())
        seqs = ["".join(parts) for parts in rows.values()]
        lengths = {len(x) for x in seqs}
        if len(lengths) == 1 and any(c.islower() for x in seqs for c in x):
            # HMMER output: insert columns hold only lower-case residues and '.'; keep the match columns
            grid = np.array([list(x) for x in seqs])
            match = np.array([any(c.isupper() or c == "-" for c in col) for col in grid.T])
            seqs = ["".join(row[match]) for row in grid]
    elif text.startswith(">"):
        name = None
        for line in text.splitlines():
            if line.startswith(">"):
                name = line[1:].strip() or str(len(rows))
                rows[name] = []
            elif line.strip() and name is not None:
                rows[name].append(line.strip())
        seqs = ["".join(parts) for parts in rows.values()]
        if path.name.endswith((".a3m", ".a3m.gz")) or len({len(x) for x in seqs}) > 1:
            seqs = ["".join(c for c in x if not (c.islower() or c == ".")) for x in seqs]
    else:
        raise ValueError(f"{path}: not a Stockholm or aligned FASTA file (first line {text[:40]!r})")
    lengths = {len(s) for s in seqs}
    if not seqs or len(lengths) != 1 or 0 in lengths:
        raise ValueError(f"{path}: rows of an alignment must be non-empty and of one length; got {sorted(lengths)[:5]}")
    codes = np.frombuffer("".join(seqs).encode("ascii", "replace"), np.uint8) & 127
    return _LOOKUP[codes].reshape(len(seqs), -1)


def family_name(path) -> str:
    """An alignment file's family name: its name up to the first '.' (``PF00069.a3m.gz`` ->
    ``PF00069``)."""
    return pathlib.Path(path).name.split(".")[0]


def read_alignments(paths) -> dict[str, np.ndarray]:
    """family name -> int8 tokens [rows, columns] of the user's alignment files, in memory;
    ValueError in one line for two files of one family name."""
    return dict(zip(_family_names(paths), (read_alignment(path) for path in paths)))


PACK_FORMAT = 1


class Alignments(collections.abc.Mapping):
    """Family name -> int8 tokens [rows, columns] of packed alignments, each read from the pack's
    file when looked up (the process holds only the alignments it is using)."""

    def __init__(self, path: pathlib.Path, names, offsets, shapes):
        self.path, self.names = path, list(names)
        self._where = {n: (int(o), tuple(int(v) for v in s)) for n, o, s in zip(self.names, offsets, shapes)}
        self._reader = data_cache.Reader(path)

    def __getitem__(self, name) -> np.ndarray:
        offset, shape = self._where[name]
        return np.frombuffer(self._reader.read(shape[0] * shape[1], offset), np.int8).reshape(shape)

    def __iter__(self):
        return iter(self.names)

    def __contains__(self, name) -> bool:  # without reading it (Mapping's would)
        return name in self._where

    def __len__(self) -> int:
        return len(self.names)

    def shape(self, name) -> tuple[int, int]:
        return self._where[name][1]

    def subset(self, names) -> "Alignments":
        """The families ``names`` (in the pack's order), read from the same file."""
        keep = set(names)
        chosen = [n for n in self.names if n in keep]
        return Alignments(self.path, chosen, [self._where[n][0] for n in chosen], [self._where[n][1] for n in chosen])


def _family_names(paths) -> list[str]:
    """The family name of each file; ValueError in one line for two files of one family name."""
    seen = {}
    for path in paths:
        name = family_name(path)
        if name in seen:
            raise ValueError(f"alignments {seen[name]} and {path} have the same family name {name!r}")
        seen[name] = path
    return list(seen)


def _load_pack(folder: pathlib.Path):
    try:
        meta = json.loads((folder / "meta.json").read_text())
        if meta.get("format") != PACK_FORMAT:
            return None
        names, shapes = list(meta["names"]), np.asarray(meta["shapes"], np.int64).reshape(-1, 2)
        sizes = shapes[:, 0] * shapes[:, 1]
        if len(names) != len(shapes) or (folder / "tokens.bin").stat().st_size != int(sizes.sum()):
            return None
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return Alignments(folder / "tokens.bin", names, np.concatenate([[0], np.cumsum(sizes)[:-1]]), shapes)


def packed_alignments(paths, cache=None) -> tuple[Alignments, dict[str, str]]:
    """The alignments of the user's files (one family per file, named as ``family_name``) packed
    once into the cache folder (``data.cache``; keyed by the files' SHA-256 and family names), and
    ``{path: sha256}`` of each: later runs read each alignment from the pack when drawn, so a
    collection of alignments larger than memory trains. One-line ValueError as ``read_alignment``
    for a bad file, and for two files of one family name."""
    paths = [pathlib.Path(p) for p in paths]
    names = _family_names(paths)

    def write(folder):
        shapes = []
        with open(folder / "tokens.bin", "wb") as out:
            for path in paths:
                a = read_alignment(path)
                out.write(np.ascontiguousarray(a, np.int8).tobytes())
                shapes.append(list(a.shape))
        (folder / "meta.json").write_text(json.dumps({"format": PACK_FORMAT, "names": names, "shapes": shapes}))

    return data_cache.cached("alignments", paths, [PACK_FORMAT, names], _load_pack, write, what="alignment",
                            cache=cache)


def load_alignments(include_pyfamsa: bool = True) -> dict[str, np.ndarray]:
    """name -> int8 tokens [rows, columns] of every shipped alignment."""
    base = _package_data("pyhmmer", "science")
    out = {pathlib.Path(rel).stem: read_alignment(base / rel) for rel in PYHMMER_ALIGNMENTS}
    if include_pyfamsa:
        fam = _package_data("pyfamsa", "science")
        out.update({rel.split(".")[0]: read_alignment(fam / rel) for rel in PYFAMSA_ALIGNMENTS})
    return out


def column_profile(msa_nr: np.ndarray, weights_nr: np.ndarray | None = None, pseudocount: float = 1.0) -> np.ndarray:
    """[N_res, 22] frequencies of amino acids, X and gap per column (rows weighted, plus pseudocounts)."""
    n, r = msa_nr.shape
    w = np.ones((n, r)) if weights_nr is None else weights_nr.astype(np.float64)
    counts = np.zeros((r, GAP_ID + 1))
    np.add.at(counts, (np.broadcast_to(np.arange(r), (n, r)), msa_nr.astype(np.int64)), w)
    counts += pseudocount
    return counts / counts.sum(axis=1, keepdims=True)


class _ByIndex(collections.abc.Sequence):
    """``alignments[names[i]]`` by index ``i``: a packed alignment is read when looked up."""

    def __init__(self, alignments, names):
        self.source, self.names = alignments, names

    def __len__(self) -> int:
        return len(self.names)

    def __getitem__(self, i):
        return self.source[self.names[i]]


class MSABatches:
    """Query-centred, cropped, masked MSA examples; ``batch(step)`` is a pure function of (seed, step).

    Fields: ``msa`` int32 [B, S, R] corrupted tokens (row 0: the query), ``target`` int32 [B, S, R]
    true tokens, ``bert_mask`` float32 [B, S, R] selected positions, ``mask_token`` float32
    [B, S, R] selected and replaced by the mask token, ``msa_mask`` / ``seq_mask`` float32 real
    rows x residues / residues, ``residue_index`` int32 [B, R], ``profile_logp`` float32
    [B, S, R] the baseline's log-probability of the target (for scoring it beside the model).
    """

    def __init__(self, alignments: dict[str, np.ndarray], *, batch_size: int, num_seq: int, num_res: int,
                 seed: int = 0, mask_rate: float = 0.15, min_coverage: float = 0.5):
        if not alignments:
            raise ValueError("no alignments to draw from")
        shape = alignments.shape if isinstance(alignments, Alignments) else (lambda n: alignments[n].shape)
        for name in alignments:
            if len(shape(name)) != 2 or shape(name)[0] < 2:
                raise ValueError(f"alignment {name!r} needs at least 2 rows; shape {shape(name)}")
        if num_seq < 2 or num_res < 1 or batch_size < 1:
            raise ValueError(f"num_seq={num_seq} (>= 2), num_res={num_res} and batch_size={batch_size} (>= 1)")
        if not 0.0 < mask_rate < 1.0:
            raise ValueError(f"mask_rate={mask_rate} must lie in (0, 1)")
        self.names = sorted(alignments)
        self.alignments = _ByIndex(alignments, self.names)  # packed ones are read when drawn
        sizes = np.array([shape(n)[0] for n in self.names], np.float64)
        self.family_p = np.sqrt(sizes) / np.sqrt(sizes).sum()   # large families more often, not overwhelmingly
        self.batch_size, self.num_seq, self.num_res, self.seed = batch_size, num_seq, num_res, seed
        self.mask_rate, self.min_coverage = mask_rate, min_coverage

    def example(self, rng: np.random.Generator) -> dict:
        return self._build(self._draw(rng))

    def _draw(self, rng: np.random.Generator) -> dict:
        """Every random decision of one example, in the order ``example`` draws them."""
        which = rng.choice(len(self.alignments), p=self.family_p)
        a = self.alignments[which]
        coverage = (a != GAP_ID).mean(axis=1)
        query = rng.choice(np.flatnonzero(coverage >= np.quantile(coverage, 0.5)))
        cols = np.flatnonzero(a[query] != GAP_ID)
        start = rng.integers(0, max(len(cols) - self.num_res, 0) + 1)
        cols = cols[start:start + self.num_res]
        others = np.setdiff1d(np.arange(a.shape[0]), [query])
        cov = (a[np.ix_(others, cols)] != GAP_ID).mean(axis=1)
        good = others[cov >= self.min_coverage]
        pool = good if len(good) >= min(self.num_seq - 1, len(others)) else others
        picked = rng.choice(pool, size=min(self.num_seq - 1, len(pool)), replace=False)
        s, r = 1 + len(picked), len(cols)
        selected = rng.random((s, r)) < self.mask_rate
        kind = rng.random((s, r))
        uniform = rng.integers(0, 20, (s, r))
        u_profile = rng.random((s, r, 1))
        return {"alignment": which, "rows": np.concatenate([[query], picked]), "cols": cols, "selected": selected,
                "kind": kind, "uniform": uniform, "u_profile": u_profile, "array": a}

    def _build(self, draw: dict) -> dict:
        """The example of ``_draw``'s decisions: crop, corrupt, score the profile, pad."""
        a, selected, kind = draw["array"], draw["selected"], draw["kind"]
        true = a[np.ix_(draw["rows"], draw["cols"])].astype(np.int32)
        s, r = true.shape
        profile = column_profile(true, (~selected).astype(np.float64))   # from the visible rows only
        cum = np.cumsum(profile, axis=1)
        from_profile = (draw["u_profile"] > cum[None, :, :]).sum(-1).clip(max=GAP_ID)
        corrupted = np.where(kind < 0.7, MASK_ID, np.where(kind < 0.8, draw["uniform"],
                                                          np.where(kind < 0.9, from_profile, true)))
        msa = np.where(selected, corrupted, true)
        logp = np.log(profile[np.arange(r)[None, :], true])
        out = {"msa": msa, "target": true, "bert_mask": selected, "mask_token": selected & (msa == MASK_ID),
               "profile_logp": logp}
        return self._pad(out, s, r)

    def _pad(self, ex: dict, s: int, r: int) -> dict:
        S, R = self.num_seq, self.num_res
        out = {}
        for k, v in ex.items():
            dtype = np.int32 if k in ("msa", "target") else np.float32
            full = np.full((S, R), GAP_ID if k in ("msa", "target") else 0, dtype)
            full[:s, :r] = v
            out[k] = full
        out["msa_mask"] = np.zeros((S, R), np.float32)
        out["msa_mask"][:s, :r] = 1.0
        out["seq_mask"] = np.zeros((R,), np.float32)
        out["seq_mask"][:r] = 1.0
        out["residue_index"] = np.arange(R, dtype=np.int32)
        return out

    def batch(self, step: int) -> dict:
        rng = np.random.default_rng([self.seed, step])
        examples = [self.example(rng) for _ in range(self.batch_size)]
        return {k: np.stack([e[k] for e in examples]) for k in examples[0]}

    def batch_rows(self, step: int, start: int, stop: int) -> dict:
        """Rows ``start:stop`` of ``batch(step)``, bit for bit: the examples before ``start`` are
        only drawn (their random decisions advance the stream), those from ``stop`` on not at all."""
        check_rows(start, stop, self.batch_size)
        rng = np.random.default_rng([self.seed, step])
        draws = [self._draw(rng) for _ in range(stop)]
        examples = [self._build(d) for d in draws[start:]]
        return {k: np.stack([e[k] for e in examples]) for k in examples[0]}

    def eval_batches(self, count: int) -> list[dict]:
        return [MSABatches.batch(self, 10_000_000 + i) for i in range(count)]


def split_families(alignments, held_out: tuple[str, ...]) -> tuple:
    """(train, held-out) alignments: whole families are held out, so no family is in both. Packed
    ``Alignments`` split into packed ones (nothing is read)."""
    missing = [n for n in held_out if n not in alignments]
    if missing:
        shown = sorted(alignments)
        raise ValueError(f"held-out alignment(s) {missing} not among {shown[:20]}"
                         + (f" and {len(shown) - 20} more" if len(shown) > 20 else ""))
    train = [k for k in alignments if k not in held_out]
    held = [k for k in alignments if k in held_out]
    if isinstance(alignments, Alignments):
        return alignments.subset(train), alignments.subset(held)
    return {k: alignments[k] for k in train}, {k: alignments[k] for k in held}


def pick_held_out(names, val_fraction: float = 0.1) -> tuple[str, ...]:
    """The families held out for validation when none are named: those whose name's CRC32 falls in
    the lowest ``val_fraction`` of buckets, at least one and never all (ValueError for fewer than
    two families). Independent of the order the files are listed in."""
    names = sorted(names)
    if len(names) < 2:
        raise ValueError(f"{len(names)} alignment family given ({', '.join(names)}): training and validation need "
                         "at least two, whole families being held out")
    bucket = {n: zlib.crc32(n.encode()) % 10_000 for n in names}
    held = [n for n in names if bucket[n] < val_fraction * 10_000]
    if not held:
        held = [min(names, key=lambda n: (bucket[n], n))]
    if len(held) == len(names):
        held.remove(max(held, key=lambda n: (bucket[n], n)))
    return tuple(held)


def alignment_hash(a: np.ndarray) -> int:
    return zlib.crc32(a.tobytes())
