"""Protein sequences: a residue tokenizer and the real proteins shipped inside the pyhmmer wheel.

The tokenizer covers the 20 standard amino acids, the ambiguous and rare codes
(X any, B = D|N, Z = E|Q, U selenocysteine, O pyrrolysine) and the special tokens
pad, mask, cls, eos. Lower-case letters are read as upper case. Any other symbol is
rejected by default (``unknown="error"``) or mapped to X (``unknown="x"``).

The corpus is ``938293.PRJEB85.HG003687.faa`` from pyhmmer's test data: the 2,100
predicted proteins of one bacterial genome. It is located with ``importlib.util.find_spec``
so pyhmmer's compiled extension is never imported.
"""

from __future__ import annotations

import importlib.util
import pathlib
import zlib

import numpy as np

from sciscale_jax.data import files

SPECIALS = ("<pad>", "<mask>", "<cls>", "<eos>")
STANDARD = "ACDEFGHIKLMNPQRSTVWY"
EXTRA = "XBZUO"


class ProteinTokenizer:
    """Residue-level tokenizer: ids 0-3 are pad, mask, cls, eos; then the 20 standard residues, then X B Z U O."""

    def __init__(self, unknown: str = "error"):
        if unknown not in ("error", "x"):
            raise ValueError(f"unknown={unknown!r} must be 'error' or 'x'")
        self.unknown = unknown
        self.tokens = SPECIALS + tuple(STANDARD) + tuple(EXTRA)
        self.pad_id, self.mask_id, self.cls_id, self.eos_id = range(4)
        self._lookup = np.full(128, -1, np.int32)
        for i, ch in enumerate(STANDARD + EXTRA, start=len(SPECIALS)):
            self._lookup[ord(ch)] = self._lookup[ord(ch.lower())] = i
        self.residue_ids = np.arange(len(SPECIALS), len(SPECIALS) + len(STANDARD), dtype=np.int32)

    @property
    def vocab_size(self) -> int:
        return len(self.tokens)

    def encode(self, sequence: str, *, add_special: bool = False) -> np.ndarray:
        """Residue string -> int32 ids (optionally wrapped as cls ... eos)."""
        codes = np.frombuffer(sequence.encode("ascii", errors="replace"), np.uint8)
        ids = self._lookup[np.minimum(codes, 127)]
        bad = ids < 0
        if bad.any():
            if self.unknown == "error":
                symbols = sorted({sequence[i] for i in np.flatnonzero(bad)})
                raise ValueError(f"unknown residue symbols {symbols} in protein sequence; "
                                 "pass unknown='x' to map them to X")
            ids = np.where(bad, self._lookup[ord("X")], ids)
        if add_special:
            ids = np.concatenate([[self.cls_id], ids, [self.eos_id]])
        return ids.astype(np.int32)

    def decode(self, ids) -> str:
        """Ids -> residue string; special tokens are dropped."""
        return "".join(self.tokens[i] for i in np.asarray(ids).tolist() if i >= len(SPECIALS))


def read_fasta(path) -> list[tuple[str, str]]:
    """(name, sequence) pairs from a FASTA file (gzip-compressed when it ends in ``.gz``), with a
    trailing stop '*' removed.

    ValueError naming the path for a missing file, a file that is not text, or one whose first
    non-empty line is not a ``>`` header.
    """
    path = pathlib.Path(path)
    text = files.read_text(path, "FASTA text")
    records, name, chunks = [], None, []
    for number, line in enumerate(text.splitlines(), start=1):
        line = line.strip()
        if line and name is None and not line.startswith(">"):
            raise ValueError(f"{path} is not a FASTA file: line {number} comes before any '>' header "
                             f"({line[:40]!r})")
        if line.startswith(">"):
            if name is not None:
                records.append((name, "".join(chunks).rstrip("*")))
            name, chunks = line[1:].split()[0] if len(line) > 1 else "", []
        elif line:
            chunks.append(line)
    if name is not None:
        records.append((name, "".join(chunks).rstrip("*")))
    return records


def pyhmmer_protein_file() -> pathlib.Path:
    """Path of the bacterial proteome FASTA shipped in the pyhmmer wheel."""
    spec = importlib.util.find_spec("pyhmmer")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("protein data needs pyhmmer: pip install 'sciscale_jax[science]'")
    root = pathlib.Path(list(spec.submodule_search_locations)[0])
    path = root / "tests" / "data" / "seqs" / "938293.PRJEB85.HG003687.faa"
    if not path.exists():
        raise FileNotFoundError(f"pyhmmer is installed but {path} is missing; reinstall 'sciscale_jax[science]'")
    return path


def load_proteins(path=None) -> list[str]:
    """Protein sequences (upper case, stop removed) from ``path`` or the pyhmmer corpus.

    ValueError naming the path for an empty, binary or non-FASTA file, or one without sequences.
    """
    path = path or pyhmmer_protein_file()
    sequences = [seq.upper() for _, seq in read_fasta(path) if seq]
    if not sequences:
        raise ValueError(f"{path} holds no protein sequences (empty, or FASTA headers without sequences)")
    return sequences


def split_by_sequence(sequences, val_fraction: float = 0.1):
    """Deterministic train/validation split keyed on each sequence's CRC32, so it never depends on order.

    Identical sequences always land on the same side, so no duplicate leaks across the split.
    """
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction={val_fraction} must lie in (0, 1)")
    train, val = [], []
    for seq in sequences:
        bucket = zlib.crc32(seq.encode()) % 10_000
        (val if bucket < val_fraction * 10_000 else train).append(seq)
    return train, val
