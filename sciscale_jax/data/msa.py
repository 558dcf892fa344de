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
import os
import pathlib
import threading
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


def _codes(text: str) -> np.ndarray:
    return np.frombuffer(text.encode("ascii", "replace"), np.uint8) & 127


def _is_lower(codes: np.ndarray) -> np.ndarray:
    return (codes >= ord("a")) & (codes <= ord("z"))


def _match_positions(codes: np.ndarray, drop: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(the codes at the kept positions, the residues at dropped positions just before each kept
    one): a row's match states and its insertion counts, as AlphaFold's A3M parser counts them
    (residues after the last match state count nowhere)."""
    inserted = np.cumsum(drop & (codes != ord(".")) & (codes != ord("-")))
    keep = np.flatnonzero(~drop)
    return codes[keep], np.diff(inserted[keep], prepend=0)


def read_alignment(path, insertions: bool = False):
    """int8 tokens [rows, columns] of a Stockholm (.sto), aligned FASTA (.afa/.fasta) or A3M
    (.a3m) file, each possibly gzip-compressed. In A3M (HHblits, ColabFold), and in a FASTA file
    whose rows differ in length, lower-case letters are insertions relative to the query and
    '.' their gaps: they are dropped, so every row runs over the query's columns; in HMMER's
    Stockholm output the insert columns (only lower-case residues and '.') are dropped.

    With ``insertions``: (tokens, int32 [rows, columns] the residues each row has in dropped
    positions just before each column), what AlphaFold's ``deletion_matrix`` counts in an A3M."""
    path = pathlib.Path(path)
    text = files.read_text(path, "text alignment")
    rows: dict[str, list[str]] = {}
    drop = None  # per row: the positions that are insertions, not columns
    if text.startswith("# STOCKHOLM"):
        blocks = [b for b in text.split("\n//") if b.strip()]
        block = max(blocks, key=lambda b: sum(1 for ln in b.splitlines() if ln.strip() and not ln.startswith("#")))
        for line in block.splitlines():  # a file of several alignments (jackhmmer rounds): the largest
            if not line.strip() or line.startswith("#") or line.startswith("//"):
                continue
            name, _, seq = line.partition(" ")
            rows.setdefault(name, []).append(seq.strip())
        seqs = [_codes("".join(parts)) for parts in rows.values()]
        if len({len(x) for x in seqs}) == 1 and any(_is_lower(x).any() for x in seqs):
            # HMMER output: insert columns hold only lower-case residues and '.'; keep the match columns
            grid = np.stack(seqs)
            insert = ~((grid >= ord("A")) & (grid <= ord("Z")) | (grid == ord("-"))).any(axis=0)
            drop = [insert] * len(seqs)
    elif text.startswith(">"):
        name = None
        for line in text.splitlines():
            if line.startswith(">"):
                name = line[1:].strip() or str(len(rows))
                rows[name] = []
            elif line.strip() and name is not None:
                rows[name].append(line.strip())
        seqs = [_codes("".join(parts)) for parts in rows.values()]
        if path.name.endswith((".a3m", ".a3m.gz")) or len({len(x) for x in seqs}) > 1:
            drop = [_is_lower(x) | (x == ord(".")) for x in seqs]
    else:
        raise ValueError(f"{path}: not a Stockholm or aligned FASTA file (first line {text[:40]!r})")
    if drop is None:
        kept, inserted = seqs, [np.zeros(len(x), np.int64) for x in seqs]
    else:
        kept, inserted = zip(*(_match_positions(x, d) for x, d in zip(seqs, drop))) if seqs else ((), ())
    lengths = {len(s) for s in kept}
    if not kept or len(lengths) != 1 or 0 in lengths:
        raise ValueError(f"{path}: rows of an alignment must be non-empty and of one length; got {sorted(lengths)[:5]}")
    tokens = _LOOKUP[np.stack(kept)]
    return (tokens, np.stack(inserted).astype(np.int32)) if insertions else tokens


def family_name(path) -> str:
    """An alignment file's family name: its name up to the first '.' (``PF00069.a3m.gz`` ->
    ``PF00069``)."""
    return pathlib.Path(path).name.split(".")[0]


def read_alignments(paths, insertions: bool = False):
    """family name -> int8 tokens [rows, columns] of the user's alignment files, in memory;
    ValueError in one line for two files of one family name. With ``insertions``: (that, family
    name -> insertion counts as ``read_alignment`` gives them)."""
    names = _family_names(paths)
    if not insertions:
        return dict(zip(names, (read_alignment(path) for path in paths)))
    read = [read_alignment(path, insertions=True) for path in paths]
    return dict(zip(names, (t for t, _ in read))), dict(zip(names, (i for _, i in read)))


PACK_FORMAT = 2  # 2: the insertion counts beside the tokens
data_cache.register_format("alignments", PACK_FORMAT)


class Alignments(collections.abc.Mapping):
    """Family name -> int8 tokens [rows, columns] of packed alignments, each read from the pack's
    file when looked up (the process holds only the alignments it is using); ``insertions(name)``
    its insertion counts, stored sparsely beside the tokens."""

    def __init__(self, path: pathlib.Path, names, offsets, shapes, inserted=None):
        self.path, self.names = path, list(names)
        self._where = {n: (int(o), tuple(int(v) for v in s)) for n, o, s in zip(self.names, offsets, shapes)}
        self._reader = data_cache.Reader(path)
        self._inserted = inserted  # {name: (first, count)} into insert_at.bin / insert_n.bin

    def __getitem__(self, name) -> np.ndarray:
        offset, shape = self._where[name]
        return np.frombuffer(self._reader.read(shape[0] * shape[1], offset), np.int8).reshape(shape)

    def insertions(self, name) -> np.ndarray:
        """int32 [rows, columns]: the residues of each row inserted just before each column."""
        shape = self._where[name][1]
        out = np.zeros(shape[0] * shape[1], np.int32)
        first, count = self._inserted[name]
        if count:
            folder = self.path.parent
            with open(folder / "insert_at.bin", "rb") as f:
                at = np.frombuffer(os.pread(f.fileno(), 8 * count, 8 * first), np.int64)
            with open(folder / "insert_n.bin", "rb") as f:
                out[at] = np.frombuffer(os.pread(f.fileno(), 4 * count, 4 * first), np.int32)
        return out.reshape(shape)

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
        return Alignments(self.path, chosen, [self._where[n][0] for n in chosen], [self._where[n][1] for n in chosen],
                          self._inserted)


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
        counts = np.asarray(meta["inserted"], np.int64)
        sizes = shapes[:, 0] * shapes[:, 1]
        if (len(names) != len(shapes) or len(counts) != len(names)
                or (folder / "tokens.bin").stat().st_size != int(sizes.sum())
                or (folder / "insert_at.bin").stat().st_size != 8 * int(counts.sum())
                or (folder / "insert_n.bin").stat().st_size != 4 * int(counts.sum())):
            return None
    except (OSError, ValueError, KeyError, TypeError):
        return None
    firsts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    return Alignments(folder / "tokens.bin", names, np.concatenate([[0], np.cumsum(sizes)[:-1]]), shapes,
                      {n: (int(f), int(c)) for n, f, c in zip(names, firsts, counts)})


def packed_alignments(paths, cache=None) -> tuple[Alignments, dict[str, str]]:
    """The alignments of the user's files (one family per file, named as ``family_name``) packed
    once into the cache folder (``data.cache``; keyed by the files' SHA-256 and family names), and
    ``{path: sha256}`` of each: later runs read each alignment from the pack when drawn, so a
    collection of alignments larger than memory trains. One-line ValueError as ``read_alignment``
    for a bad file, and for two files of one family name."""
    paths = [pathlib.Path(p) for p in paths]
    names = _family_names(paths)

    def write(folder):
        shapes, inserted = [], []
        with (open(folder / "tokens.bin", "wb") as out, open(folder / "insert_at.bin", "wb") as at,
              open(folder / "insert_n.bin", "wb") as n):
            for path in paths:
                a, ins = read_alignment(path, insertions=True)
                out.write(np.ascontiguousarray(a, np.int8).tobytes())
                where = np.flatnonzero(ins)
                at.write(where.astype(np.int64).tobytes())
                n.write(ins.ravel()[where].astype(np.int32).tobytes())
                shapes.append(list(a.shape))
                inserted.append(len(where))
        (folder / "meta.json").write_text(json.dumps({"format": PACK_FORMAT, "names": names, "shapes": shapes,
                                                      "inserted": inserted}))

    return data_cache.cached("alignments", paths, [PACK_FORMAT, names], _load_pack, write, what="alignment",
                            cache=cache)


def load_alignments(include_pyfamsa: bool = True, insertions: bool = False):
    """name -> int8 tokens [rows, columns] of every shipped alignment; with ``insertions``: (that,
    name -> insertion counts as ``read_alignment`` gives them)."""
    base = _package_data("pyhmmer", "science")
    paths = {pathlib.Path(rel).stem: base / rel for rel in PYHMMER_ALIGNMENTS}
    if include_pyfamsa:
        fam = _package_data("pyfamsa", "science")
        paths.update({rel.split(".")[0]: fam / rel for rel in PYFAMSA_ALIGNMENTS})
    if not insertions:
        return {name: read_alignment(path) for name, path in paths.items()}
    read = {name: read_alignment(path, insertions=True) for name, path in paths.items()}
    return {n: t for n, (t, _) in read.items()}, {n: i for n, (_, i) in read.items()}


def column_profile(msa_nr: np.ndarray, weights_nr: np.ndarray | None = None, pseudocount: float = 1.0) -> np.ndarray:
    """[N_res, 22] frequencies of amino acids, X and gap per column (rows weighted, plus pseudocounts)."""
    n, r = msa_nr.shape
    w = np.ones((n, r)) if weights_nr is None else weights_nr.astype(np.float64)
    at = np.arange(r)[None, :] * (GAP_ID + 1) + msa_nr.astype(np.int64)
    counts = np.bincount(at.ravel(), weights=np.broadcast_to(w, (n, r)).ravel(), minlength=r * (GAP_ID + 1))
    counts = counts.reshape(r, GAP_ID + 1) + pseudocount
    return counts / counts.sum(axis=1, keepdims=True)


def deletion_matrix(tokens: np.ndarray, inserted: np.ndarray | None, rows, cols, before: int = -1) -> np.ndarray:
    """float32 [len(rows), len(cols)]: AlphaFold's ``deletion_matrix`` of alignment rows ``rows``
    over the query's columns ``cols`` (ascending, where the query has residues): at each column,
    the row's residues skipped since the query's previous column (``before`` for ``cols[0]``: the
    query column preceding the crop, -1 for none): those inserted before a column (``inserted``,
    from ``read_alignment(..., insertions=True)``; None: none) and those in columns where the
    query has a gap, as AlphaFold's Stockholm and A3M parsers count them."""
    cols, rows = np.asarray(cols, np.int64), np.asarray(rows, np.int64)
    lo = before + 1   # only the columns from just after ``before`` to the last one matter
    zero = np.zeros((len(rows), 1), np.int32)
    span = tokens[:, lo:cols[-1] + 1][rows]
    residues = np.concatenate([zero, np.cumsum(span != GAP_ID, axis=1, dtype=np.int32)], axis=1)  # in columns < j
    prev = np.concatenate([[before], cols[:-1]]) + 1 - lo
    at = cols - lo
    out = residues[:, at] - residues[:, prev]
    if inserted is not None:
        span = inserted[:, lo:cols[-1] + 1][rows]
        if span.any():
            ins = np.concatenate([zero, np.cumsum(span, axis=1, dtype=np.int32)], axis=1)
            out = out + ins[:, at + 1] - ins[:, prev]
    return out.astype(np.float32)


def _without(n: int, rows) -> np.ndarray:
    """0..n-1 in order, ``rows`` left out (``np.setdiff1d(np.arange(n), rows)`` without its sort)."""
    keep = np.ones(n, bool)
    keep[rows] = False
    return np.flatnonzero(keep)


def _one_hot(x: np.ndarray, n: int) -> np.ndarray:
    return (x[..., None] == np.arange(n)).astype(np.float32)


def cluster_summaries(msa: np.ndarray, deletion: np.ndarray, extra: np.ndarray, extra_deletion: np.ndarray,
                      block: int = 64, members: bool = False) -> tuple:
    """AlphaFold's ``nearest_neighbor_clusters`` and ``summarize_clusters`` (gap agreement weight
    0): each extra row [E, R] joins the cluster centre (row of ``msa`` [S, R]) it agrees with at the
    most columns (the same amino acid or X; gaps and the mask token agree with nothing; ties: the
    first centre); returns ``cluster_profile`` float32 [S, R, 23] (the centre's one-hot plus its
    members', over 1 + members) and ``cluster_deletion_mean`` [S, R]; with ``members`` also the
    members' token counts [S, R, 23] and how many each centre has [S]. Centres are compared
    ``block`` at a time (memory O(block x E x R) bytes)."""
    s, r = msa.shape
    msa, extra = np.asarray(msa), np.asarray(extra)
    if len(extra):
        agree = np.empty((len(extra), s), np.int32)
        counted = np.where(msa < GAP_ID, msa, -1).astype(np.int8)   # gaps and mask tokens match nothing
        tokens = extra.astype(np.int8)  # (tokens < 23: compared a byte at a time, the matches summed as bytes)
        for i in range(0, s, block):
            same = tokens[None] == counted[i:i + block, None]
            agree[:, i:i + block] = same.view(np.uint8).sum(axis=2, dtype=np.int32).T
        assign = np.argmax(agree, axis=1)
    else:
        assign = np.zeros(0, np.int64)
    size = np.bincount(assign, minlength=s).astype(np.float64)
    at = assign[:, None] * r + np.arange(r)[None, :]          # [E, R]: (centre, column)
    hist = np.bincount((at * NUM_CLASSES + extra).ravel(), minlength=s * r * NUM_CLASSES)
    hist = hist.reshape(s, r, NUM_CLASSES)
    deletions = np.bincount(at.ravel(), weights=np.asarray(extra_deletion, np.float64).ravel(), minlength=s * r)
    deletions = deletions.reshape(s, r) + deletion
    total = (1e-6 + 1.0 + size)[:, None]
    out = (((hist + _one_hot(msa, NUM_CLASSES)) / total[..., None]).astype(np.float32),
           (deletions / total).astype(np.float32))
    return out + (hist, size) if members else out


FEATURES = ("onehot", "alphafold")


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
    [B, S, R] the baseline's log-probability of the target and ``profile_hit`` whether its most
    frequent class is the target (for scoring it beside the model).

    ``features="alphafold"`` adds what AlphaFold 2's input features are made of, the S rows being
    its cluster centres and every other row of the alignment the extra rows: ``deletion`` float32
    [B, S, R] (``deletion_matrix`` relative to the drawn query), ``cluster_profile`` [B, S, R, 23]
    and ``cluster_deletion_mean`` [B, S, R] (``cluster_summaries`` of the corrupted centres and
    every extra row), the nearest-rows baseline ``cluster_logp`` and ``cluster_hit`` [B, S, R]
    (the residues of the rows in each row's cluster, the column profile as a prior of weight
    1) and, with ``num_extra_seq`` E > 0, E extra rows drawn at random as
    ``extra_msa`` int32 [B, E, R] (true tokens), ``extra_deletion`` and ``extra_msa_mask`` float32
    [B, E, R]. The baseline's profile then counts the extra rows too (the model sees them). Deletion
    counts come from ``insertions`` (name -> ``read_alignment(..., insertions=True)``'s counts;
    packed ``Alignments`` carry their own) and from the columns the query skips.
    """

    def __init__(self, alignments: dict[str, np.ndarray], *, batch_size: int, num_seq: int, num_res: int,
                 seed: int = 0, mask_rate: float = 0.15, min_coverage: float = 0.5, features: str = "onehot",
                 num_extra_seq: int = 0, insertions=None):
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
        if features not in FEATURES:
            raise ValueError(f"features={features!r} must be one of {', '.join(FEATURES)}")
        if num_extra_seq < 0 or (num_extra_seq and features != "alphafold"):
            raise ValueError(f"num_extra_seq={num_extra_seq}: extra rows are AlphaFold features (features='alphafold', "
                             ">= 0)")
        self.names = sorted(alignments)
        self.alignments = _ByIndex(alignments, self.names)  # packed ones are read when drawn
        self.features, self.num_extra_seq = features, num_extra_seq
        if isinstance(alignments, Alignments) and insertions is None:
            insertions = _Inserted(alignments)
        self.insertions = None if insertions is None else _ByIndex(insertions, self.names)
        sizes = np.array([shape(n)[0] for n in self.names], np.float64)
        self.family_p = np.sqrt(sizes) / np.sqrt(sizes).sum()   # large families more often, not overwhelmingly
        self.batch_size, self.num_seq, self.num_res, self.seed = batch_size, num_seq, num_res, seed
        self.mask_rate, self.min_coverage = mask_rate, min_coverage
        self._query_rows, self._lock = {}, threading.Lock()  # _queries

    def example(self, rng: np.random.Generator) -> dict:
        return self._build(self._draw(rng))

    def _queries(self, which: int, a: np.ndarray) -> np.ndarray:
        """The rows of alignment ``which`` (``a``) a query is drawn from: those covering at least the
        median share of its columns; computed once per alignment, not per example (the last 4,096
        alignments' kept; safe from the threads that build batches ahead)."""
        with self._lock:
            found = self._query_rows.get(which)
        if found is None:
            coverage = (a != GAP_ID).mean(axis=1)
            found = np.flatnonzero(coverage >= np.quantile(coverage, 0.5))
            with self._lock:
                self._query_rows[which] = found
                if len(self._query_rows) > 4096:
                    self._query_rows.pop(next(iter(self._query_rows)))
        return found

    def _draw(self, rng: np.random.Generator) -> dict:
        """Every random decision of one example, in the order ``example`` draws them."""
        which = rng.choice(len(self.alignments), p=self.family_p)
        a = self.alignments[which]
        query = rng.choice(self._queries(which, a))
        cols = np.flatnonzero(a[query] != GAP_ID)
        start = rng.integers(0, max(len(cols) - self.num_res, 0) + 1)
        before = cols[start - 1] if start else -1   # the query's column before the crop
        cols = cols[start:start + self.num_res]
        others = _without(a.shape[0], [query])
        cov = (a[np.ix_(others, cols)] != GAP_ID).mean(axis=1)
        good = others[cov >= self.min_coverage]
        pool = good if len(good) >= min(self.num_seq - 1, len(others)) else others
        picked = rng.choice(pool, size=min(self.num_seq - 1, len(pool)), replace=False)
        s, r = 1 + len(picked), len(cols)
        selected = rng.random((s, r)) < self.mask_rate
        kind = rng.random((s, r))
        uniform = rng.integers(0, 20, (s, r))
        u_profile = rng.random((s, r, 1))
        draw = {"alignment": which, "rows": np.concatenate([[query], picked]), "cols": cols, "selected": selected,
                "kind": kind, "uniform": uniform, "u_profile": u_profile, "array": a}
        if self.features == "alphafold":  # every other row is an extra row; E of them, at random, are seen
            rest = _without(a.shape[0], draw["rows"])
            draw.update(before=before, rest=rest, extra=rng.permutation(len(rest))[:self.num_extra_seq])
        return draw

    def _build(self, draw: dict) -> dict:
        """The example of ``_draw``'s decisions: crop, corrupt, score the profile, pad."""
        a, selected, kind = draw["array"], draw["selected"], draw["kind"]
        true = a[np.ix_(draw["rows"], draw["cols"])].astype(np.int32)
        s, r = true.shape
        alphafold = self.features == "alphafold"
        if alphafold:  # the model sees every other row (cluster profiles), so the baseline does too
            rest = a[np.ix_(draw["rest"], draw["cols"])].astype(np.int32)
            profile = column_profile(np.concatenate([true, rest]),
                                     np.concatenate([~selected, np.ones(rest.shape, bool)]).astype(np.float64))
        else:
            profile = column_profile(true, (~selected).astype(np.float64))   # from the visible rows only
        cum = np.cumsum(profile, axis=1)
        from_profile = (draw["u_profile"] > cum[None, :, :]).sum(-1).clip(max=GAP_ID)
        corrupted = np.where(kind < 0.7, MASK_ID, np.where(kind < 0.8, draw["uniform"],
                                                          np.where(kind < 0.9, from_profile, true)))
        msa = np.where(selected, corrupted, true)
        logp = np.log(profile[np.arange(r)[None, :], true])
        out = {"msa": msa, "target": true, "bert_mask": selected, "mask_token": selected & (msa == MASK_ID),
               "profile_logp": logp, "profile_hit": profile.argmax(axis=1)[None, :] == true}
        if alphafold:
            inserted = None if self.insertions is None else self.insertions[draw["alignment"]]
            deletion = deletion_matrix(a, inserted, draw["rows"], draw["cols"], draw["before"])
            rest_deletion = deletion_matrix(a, inserted, draw["rest"], draw["cols"], draw["before"])
            out["deletion"] = deletion
            out["cluster_profile"], out["cluster_deletion_mean"], hist, size = cluster_summaries(
                msa, deletion, rest, rest_deletion, members=True)
            # a second baseline: the true residues of the rows each row's cluster gathered (the rows
            # nearest it), the column profile as a prior of weight 1
            near = (hist[..., :GAP_ID + 1] + profile[None]) / (size[:, None, None] + 1.0)
            out["cluster_logp"] = np.log(np.take_along_axis(near, true[..., None], axis=-1)[..., 0])
            out["cluster_hit"] = near.argmax(axis=-1) == true
            if self.num_extra_seq:
                e = draw["extra"]
                out.update(extra_msa=rest[e], extra_deletion=rest_deletion[e])
        return self._pad(out, s, r)

    def _pad(self, ex: dict, s: int, r: int) -> dict:
        S, R, E = self.num_seq, self.num_res, self.num_extra_seq
        out = {}
        for k, v in ex.items():
            dtype = np.int32 if k in ("msa", "target", "extra_msa") else np.float32
            rows = E if k.startswith("extra_") else S
            full = np.full((rows, R) + v.shape[2:], GAP_ID if dtype == np.int32 else 0, dtype)
            full[:v.shape[0], :r] = v
            out[k] = full
        if self.features == "alphafold" and E:
            out["extra_msa_mask"] = np.zeros((E, R), np.float32)
            out["extra_msa_mask"][:len(ex["extra_msa"]), :r] = 1.0
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


class _Inserted(collections.abc.Mapping):
    """name -> insertion counts of packed ``Alignments``, read when looked up."""

    def __init__(self, alignments: Alignments):
        self.alignments = alignments

    def __getitem__(self, name) -> np.ndarray:
        return self.alignments.insertions(name)

    def __iter__(self):
        return iter(self.alignments)

    def __len__(self) -> int:
        return len(self.alignments)


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
