"""SMILES data: an atom-level regex tokenizer, the molecules shipped in the rdkit wheel, causal-LM
batches and an n-gram baseline.

Tokenizer: the atom-level regular expression of Schwaller et al. 2019 ("Molecular Transformer"),
written out here: a bracket atom (``[nH+]``, ``[C@@H]``, ``[13CH3]``) is one token, as are the
two-letter organic-subset elements ``Cl`` and ``Br``, a two-digit ring closure ``%10``, and every
other single character (atoms, aromatic atoms, ring digits, bonds ``- = # $ : / \\``, branches,
the fragment dot). Joining a SMILES' tokens gives back the string.

Corpus (``load_molecules``): three SMILES files inside the rdkit wheel, located with
``importlib.util.find_spec`` so nothing is imported from rdkit to find them:
``Data/NCI/first_5K.smi`` (5,000 NCI compounds), ``Data/Pains/test_data/wehi_mols.csv`` (10,000
WEHI screening compounds) and ``Contrib/FreeWilson/data/CHEMBL2321810.smi`` (1,017 ChEMBL
compounds). Each is parsed by RDKit and curated as GuacaMol (Brown et al. 2019) and MOSES
(Polykovskiy et al. 2020) curate theirs (``curate``): the largest fragment is kept (salts and
solvents dropped), acids and bases are neutralised (RDKit's ``Uncharger``), and a molecule is
left out when it holds an element outside B C N O F P S Cl Br I (metals, Si, Se, As ...), a
radical, an isotope label, a charge other than N+ / O- or a net charge (quaternary ammonium
salts), or more than 50 heavy atoms. The survivors are written as canonical SMILES and
deduplicated; the result is packed once on disk (``smiles_pack``: curated in parallel, read when
drawn, so corpora larger than memory train). The split is
keyed on a CRC32 of the canonical SMILES, so it never depends on file order and a molecule
never sits on both sides.

Forms (``SMILES_FORMS``): "aromatic" is RDKit's canonical SMILES with lowercase aromatic atoms
(``c1ccccc1``); "kekule" writes the same canonical atom order with alternating single and double
bonds and no aromatic atoms (``C1=CC=CC=C1``), so a language model never has to learn which ring
sizes and heteroatoms make a kekulisable aromatic system.
"""

from __future__ import annotations

import collections
import collections.abc
import importlib.util
import math
import pathlib
import re
import zlib

import numpy as np

from sciscale_jax.data import cache as data_cache
from sciscale_jax.data import files
from sciscale_jax.data.packed import line_blocks

SMILES_REGEX = re.compile(r"(\[[^\]]+\]|Br|Cl|%\d{2}|[BCNOPSFI]|[bcnops]|[0-9]|[-=#$:/\\().+*~@?>]|.)")
SPECIALS = ("<pad>", "<bos>", "<eos>", "<unk>")
RDKIT_FILES = ("Data/NCI/first_5K.smi", "Data/Pains/test_data/wehi_mols.csv",
               "Contrib/FreeWilson/data/CHEMBL2321810.smi")
CHEM_EXTRA = 'SMILES data needs rdkit: pip install -e ".[chem]"'
SMILES_FORMS = ("aromatic", "kekule")


def tokenize(smiles: str) -> list[str]:
    """Atom-level tokens of ``smiles``; ``"".join(tokenize(s)) == s`` for every string."""
    return SMILES_REGEX.findall(smiles)


class SmilesTokenizer:
    """Ids 0-3 are pad, bos, eos, unk; then the training split's tokens, most frequent first."""

    def __init__(self, tokens):
        tokens = list(tokens)
        if len(set(tokens)) != len(tokens) or set(tokens) & set(SPECIALS):
            raise ValueError("tokenizer tokens must be distinct and exclude the special tokens")
        self.tokens = SPECIALS + tuple(tokens)
        self.pad_id, self.bos_id, self.eos_id, self.unk_id = range(4)
        self._index = {t: i for i, t in enumerate(self.tokens)}

    @classmethod
    def from_smiles(cls, smiles_list, min_count: int = 1) -> "SmilesTokenizer":
        """The vocabulary of ``smiles_list``: tokens seen at least ``min_count`` times, by count then name."""
        counts = collections.Counter(t for s in smiles_list for t in tokenize(s))
        kept = sorted((t for t, c in counts.items() if c >= min_count), key=lambda t: (-counts[t], t))
        return cls(kept)

    @property
    def vocab_size(self) -> int:
        return len(self.tokens)

    def encode(self, smiles: str, *, add_special: bool = True) -> np.ndarray:
        """SMILES -> int32 ids, wrapped as bos ... eos by default; unseen tokens become unk."""
        ids = [self._index.get(t, self.unk_id) for t in tokenize(smiles)]
        if add_special:
            ids = [self.bos_id] + ids + [self.eos_id]
        return np.asarray(ids, np.int32)

    def decode(self, ids) -> str:
        """Ids -> SMILES: stops at the first eos or pad, drops bos; unk decodes as '?'."""
        out = []
        for i in np.asarray(ids).tolist():
            if i in (self.eos_id, self.pad_id):
                break
            if i == self.bos_id:
                continue
            out.append("?" if i == self.unk_id else self.tokens[i])
        return "".join(out)


# --- the corpus ---------------------------------------------------------------------------------------------

def _rdkit_root() -> pathlib.Path:
    spec = importlib.util.find_spec("rdkit")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(CHEM_EXTRA)
    return pathlib.Path(list(spec.submodule_search_locations)[0])


def rdkit_smiles_files() -> list[pathlib.Path]:
    """Paths of the SMILES files shipped in the rdkit wheel that make up the corpus."""
    root = _rdkit_root()
    paths = [root / rel for rel in RDKIT_FILES]
    missing = [str(p) for p in paths if not p.exists()]
    if missing:
        raise FileNotFoundError(f"rdkit is installed but {missing} are missing; reinstall rdkit")
    return paths


SMILES_SUFFIXES = (".smi", ".csv", ".txt", ".smi.gz", ".csv.gz", ".txt.gz")


def user_smiles_files(spec: str) -> list[pathlib.Path]:
    """The SMILES files a ``--corpus`` of comma-separated files and folders names (a folder: its
    ``SMILES_SUFFIXES`` files); ValueError in one line for a path that does not exist."""
    return files.expand(spec, SMILES_SUFFIXES, "--corpus")


def smiles_records(path):
    """The first column of each record of a .smi / .txt (whitespace) or .csv (comma, quoted) file,
    each possibly gzip-compressed, read a block at a time; '#' lines and a header whose first field
    is ``SMILES`` are skipped. ValueError in one line naming the path for a missing or non-text file."""
    comma = str(path).endswith((".csv", ".csv.gz"))
    started = False
    for block, _ in line_blocks(path, "SMILES text"):
        for line in block.decode("utf-8").splitlines():
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            first = (line.split(",")[0] if comma else line.split()[0]).strip().strip('"')
            if not started and first.upper() == "SMILES":
                continue
            started = True
            yield first


def read_smiles_file(path) -> list[str]:
    """Every record of ``smiles_records(path)``, as a list."""
    return list(smiles_records(path))


def canonical(smiles: str, largest_fragment: bool = True) -> str | None:
    """RDKit canonical SMILES of ``smiles`` (its largest fragment by heavy atoms), or None if it does not parse."""
    try:
        from rdkit import Chem, RDLogger
    except ImportError as err:
        raise ImportError(CHEM_EXTRA) from err
    RDLogger.DisableLog("rdApp.*")
    mol = Chem.MolFromSmiles(smiles)
    if mol is None or mol.GetNumAtoms() == 0:
        return None
    if largest_fragment:
        frags = Chem.GetMolFrags(mol, asMols=True)
        mol = max(frags, key=lambda m: (m.GetNumHeavyAtoms(), Chem.MolToSmiles(m)))
    return Chem.MolToSmiles(mol)


def to_form(smiles: str, form: str = "aromatic") -> str:
    """Canonical ``smiles`` written in ``form``: "aromatic" (RDKit's default) or "kekule" (no aromatic atoms)."""
    if form not in SMILES_FORMS:
        raise ValueError(f"form={form!r} must be one of {SMILES_FORMS}")
    from rdkit import Chem

    mol = Chem.MolFromSmiles(smiles)
    if mol is None:
        raise ValueError(f"RDKit cannot parse {smiles!r}")
    if form == "aromatic":
        return Chem.MolToSmiles(mol)
    Chem.Kekulize(mol, clearAromaticFlags=True)
    return Chem.MolToSmiles(mol, kekuleSmiles=True, canonical=True)


ALLOWED_ELEMENTS = frozenset({"B", "C", "N", "O", "F", "P", "S", "Cl", "Br", "I"})
ALLOWED_CHARGES = frozenset({("N", 1), ("O", -1)})  # nitro groups, N-oxides, betaines
MAX_HEAVY_ATOMS = 50


def curate(smiles: str) -> str | None:
    """Canonical SMILES of the curated largest fragment of ``smiles``, or None when it is left out.

    Largest fragment by heavy atoms; neutralised by RDKit's ``Uncharger`` (carboxylates,
    protonated amines); then refused if any atom is outside ``ALLOWED_ELEMENTS``, carries a
    radical or an isotope label, or a formal charge outside ``ALLOWED_CHARGES``, if the net
    charge is not zero, or if there are more than ``MAX_HEAVY_ATOMS`` heavy atoms.
    """
    can = canonical(smiles)
    if can is None:
        return None
    from rdkit import Chem
    from rdkit.Chem.MolStandardize import rdMolStandardize

    mol = rdMolStandardize.Uncharger().uncharge(Chem.MolFromSmiles(can))
    atoms = mol.GetAtoms()
    if (mol.GetNumHeavyAtoms() > MAX_HEAVY_ATOMS
            or any(a.GetSymbol() not in ALLOWED_ELEMENTS or a.GetNumRadicalElectrons() or a.GetIsotope()
                   or (a.GetFormalCharge() and (a.GetSymbol(), a.GetFormalCharge()) not in ALLOWED_CHARGES)
                   for a in atoms)
            or sum(a.GetFormalCharge() for a in atoms)):
        return None
    return Chem.MolToSmiles(mol)


def cache_dir() -> pathlib.Path:
    """Where processed data is cached: ``$SCISCALE_CACHE``, else ``~/.cache/sciscale_jax``."""
    return data_cache.cache_root()


def load_molecules(paths=None, *, cache: bool = True, curated: bool = True, form: str = "aromatic",
                   limit: int = 0, workers: int | None = None) -> list[str]:
    """Canonical, deduplicated SMILES of ``paths`` (default: the rdkit corpus), in file order, as a
    list (for corpora that fit in memory; ``smiles_pack.packed_smiles`` for any size).

    ``curated=True`` passes each molecule through ``curate`` (the molecules it refuses are left
    out); ``False`` keeps every parsable molecule's largest fragment as it is. ``form`` writes
    each molecule as "aromatic" or "kekule" SMILES (``to_form``); molecule i is the same in
    every form, so lists of two forms align index by index. ``limit`` keeps the first N distinct
    molecules and reads no further (for large sources such as MOSES). The molecules are curated
    by ``workers`` processes and packed once into ``cache_dir()`` (``smiles_pack``), keyed by the
    SHA-256 of the source files, the curation, form, limit and RDKit version; a pack that is cut
    short or of another format is written anew, never used. ``cache=False`` packs into a
    temporary folder.
    """
    from sciscale_jax.data import smiles_pack

    pack, _ = smiles_pack.packed_smiles([str(p) for p in (paths or rdkit_smiles_files())], curated=curated,
                                        form=form, limit=limit, workers=workers, use_cache=cache)
    return [pack.smiles(j) for j in range(len(pack))]


MOSES_EXTRA = "the MOSES corpus needs molsets' data files: pip install molsets --no-deps"


def moses_smiles_files(splits=("train", "test")) -> list[pathlib.Path]:
    """Paths of the MOSES benchmark set (Polykovskiy et al. 2020) shipped in the optional
    ``molsets`` wheel (``moses/dataset/data/<split>.csv.gz``), found without importing it (its
    dependencies are not needed: ``pip install molsets --no-deps``)."""
    spec = importlib.util.find_spec("moses")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(MOSES_EXTRA)
    root = pathlib.Path(list(spec.submodule_search_locations)[0]) / "dataset" / "data"
    paths = [root / f"{split}.csv.gz" for split in splits]
    missing = [str(p) for p in paths if not p.exists()]
    if missing:
        raise FileNotFoundError(f"molsets is installed but {missing} are missing; reinstall it")
    return paths


def load_moses(split: str = "train") -> list[str]:
    """The MOSES SMILES of one split as written in the data file (not canonicalised here)."""
    return read_smiles_file(moses_smiles_files((split,))[0])


def split_by_hash(smiles_list, val_fraction: float = 0.1, keys=None):
    """(train, validation): a molecule goes to validation when CRC32(canonical SMILES) falls in the bottom fraction.

    ``keys`` (default: ``smiles_list``) are the strings hashed, one per molecule: pass the aromatic
    canonical SMILES to split Kekulé SMILES exactly as their aromatic forms are split.
    """
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction={val_fraction} must lie in (0, 1)")
    keys = smiles_list if keys is None else keys
    if len(keys) != len(smiles_list):
        raise ValueError(f"keys has {len(keys)} entries for {len(smiles_list)} SMILES")
    train, val = [], []
    for smi, key in zip(smiles_list, keys):
        (val if zlib.crc32(key.encode()) % 10_000 < val_fraction * 10_000 else train).append(smi)
    return train, val


# --- batches ------------------------------------------------------------------------------------------------

def pad_rows(ids_list, seq_len: int, pad_id: int):
    """Each id array cut to its first ``seq_len`` ids and right-padded; returns (tokens, real)."""
    tokens = np.full((len(ids_list), seq_len), pad_id, np.int32)
    for row, ids in enumerate(ids_list):
        tokens[row, :min(len(ids), seq_len)] = ids[:seq_len]
    return tokens, tokens != pad_id


class CausalLMBatches:
    """Seeded next-token batches ``{"inputs", "mask"}`` over encoded molecules (bos ... eos).

    ``batch(step)`` is a pure function of (seed, step): a resumed run sees the batches an
    uninterrupted run would have seen. The loss predicts token t+1 from tokens up to t.
    ``pack=True`` fills each training row with whole molecules drawn one after another
    (bos ... eos bos ... eos ...), the last one cut at the row's end, as GPT-style
    pretraining packs documents: no row is padding, so a step trains on about
    seq_len / mean length more molecules. With ``segments=True`` packed batches also carry
    ``segments`` (each token's molecule in its row, 1, 2, ...; 0 for padding), so the model can keep
    the molecules apart. Evaluation batches are never packed.
    """

    def __init__(self, encoded, pad_id: int, *, batch_size: int, seq_len: int, seed: int = 0, pack: bool = False,
                 segments: bool = False):
        if batch_size <= 0 or seq_len < 2:
            raise ValueError(f"batch_size={batch_size} must be > 0 and seq_len={seq_len} >= 2")
        if not len(encoded):
            raise ValueError("no molecules to batch")
        # a sequence (smiles_pack.Molecules: read from disk when drawn) is kept as it is
        self.encoded = encoded if isinstance(encoded, collections.abc.Sequence) else list(encoded)
        self.pad_id = pad_id
        self._lengths = encoded.lengths() if hasattr(encoded, "lengths") else None  # without reading them
        self.batch_size, self.seq_len, self.seed, self.pack = batch_size, seq_len, seed, pack
        self.segments = bool(segments) and pack

    def _make(self, ids_list):
        tokens, real = pad_rows(ids_list, self.seq_len, self.pad_id)
        return {"inputs": tokens, "mask": real}

    def _make_packed(self, rows):
        """A batch of packed rows, each a list of molecules (the last one cut at the row's end)."""
        batch = self._make([np.concatenate(row) for row in rows])
        if self.segments:
            batch["segments"] = np.stack([np.repeat(np.arange(1, len(row) + 1, dtype=np.int32),
                                                    [len(ids) for ids in row])[:self.seq_len] for row in rows])
        return batch

    def batch(self, step: int) -> dict:
        rng = np.random.default_rng([self.seed, step])
        if not self.pack:
            picks = rng.integers(0, len(self.encoded), self.batch_size)
            return self._make([self.encoded[i] for i in picks])
        rows = []
        for _ in range(self.batch_size):
            row, filled = [], 0
            while filled < self.seq_len:
                ids = self.encoded[int(rng.integers(0, len(self.encoded)))]
                row.append(ids)
                filled += len(ids)
            rows.append(row)
        return self._make_packed(rows)

    def batch_rows(self, step: int, start: int, stop: int) -> dict:
        """Rows ``start:stop`` of ``batch(step)``, bit for bit, padding (or packing) only those rows.

        Packed rows before ``start`` are drawn, not built: only their molecules' lengths are read.
        """
        if not (isinstance(start, int) and isinstance(stop, int) and 0 <= start < stop <= self.batch_size):
            raise ValueError(f"rows start={start!r}, stop={stop!r} must satisfy 0 <= start < stop <= "
                             f"batch_size={self.batch_size}")
        rng = np.random.default_rng([self.seed, step])
        if not self.pack:
            picks = rng.integers(0, len(self.encoded), self.batch_size)
            return self._make([self.encoded[i] for i in picks[start:stop]])
        rows = []
        for row in range(stop):
            picks, filled = [], 0
            while filled < self.seq_len:
                picks.append(int(rng.integers(0, len(self.encoded))))
                filled += len(self.encoded[picks[-1]]) if self._lengths is None else int(self._lengths[picks[-1]])
            if row >= start:
                rows.append([self.encoded[i] for i in picks])
        return self._make_packed(rows)

    def eval_batches(self) -> list[dict]:
        """Every molecule once, in order; the last batch is filled with empty (all-pad) rows."""
        out = []
        for start in range(0, len(self.encoded), self.batch_size):
            chunk = self.encoded[start:start + self.batch_size]
            out.append(self._make(chunk + [np.zeros(0, np.int32)] * (self.batch_size - len(chunk))))
        return out


# --- baselines ----------------------------------------------------------------------------------------------

class NGramModel:
    """Token n-gram LM with add-k smoothing over the tokenizer's predictable ids (all but pad and bos).

    P(w | h) = (c(h, w) + k) / (c(h) + k |V|), h the previous n-1 ids with bos padding the start.
    """

    def __init__(self, encoded, vocab_size: int, *, n: int = 4, k: float = 0.1, pad_id: int = 0, bos_id: int = 1):
        if n < 1 or k <= 0:
            raise ValueError(f"n={n} must be >= 1 and k={k} > 0")
        self.n, self.k, self.vocab_size, self.bos_id = n, k, vocab_size, bos_id
        self.support = np.array([i for i in range(vocab_size) if i not in (pad_id, bos_id)])
        self.counts: dict = collections.defaultdict(collections.Counter)
        for ids in encoded:
            for ctx, w in self._events(ids):
                self.counts[ctx][w] += 1

    def _events(self, ids):
        ids = [int(i) for i in ids]
        body = ids[1:] if ids and ids[0] == self.bos_id else ids
        padded = [self.bos_id] * (self.n - 1) + body
        for t in range(len(body)):
            yield tuple(padded[t:t + self.n - 1]), body[t]

    def probs(self, context) -> np.ndarray:
        """Next-id distribution over the whole vocabulary (zero on pad and bos) after ``context``."""
        context = [self.bos_id] * (self.n - 1) + [int(i) for i in context]
        ctx = tuple(context[len(context) - (self.n - 1):]) if self.n > 1 else ()
        counts = self.counts.get(ctx, {})
        p = np.zeros(self.vocab_size)
        p[self.support] = self.k
        for w, c in counts.items():
            p[w] += c
        return p / p.sum()

    def log_prob(self, ctx, w) -> float:
        counts = self.counts.get(ctx, {})
        return math.log((counts.get(w, 0) + self.k) / (sum(counts.values()) + self.k * len(self.support)))

    def perplexity(self, encoded) -> float:
        """exp(mean NLL per predicted token) over molecules encoded bos ... eos (every token after bos)."""
        nll, n = 0.0, 0
        for ids in encoded:
            for ctx, w in self._events(ids):
                nll -= self.log_prob(ctx, w)
                n += 1
        return math.exp(nll / n)

    def sample(self, num: int, tokenizer, *, max_len: int = 128, seed: int = 0) -> list[str]:
        """``num`` SMILES drawn token by token until eos or ``max_len`` tokens."""
        rng = np.random.default_rng(seed)
        out = []
        for _ in range(num):
            ids = []
            while len(ids) < max_len:
                w = int(rng.choice(self.vocab_size, p=self.probs(ids)))
                if w == tokenizer.eos_id:
                    break
                ids.append(w)
            out.append(tokenizer.decode(ids))
        return out


def unigram_perplexity(train_encoded, val_encoded, vocab_size: int, pad_id: int = 0, bos_id: int = 1) -> float:
    """Perplexity on the validation tokens (after bos) of the training split's add-one token frequencies."""
    return NGramModel(train_encoded, vocab_size, n=1, k=1.0, pad_id=pad_id, bos_id=bos_id).perplexity(val_encoded)


# --- generation metrics -------------------------------------------------------------------------------------

def generation_metrics(samples, train_smiles=(), *, diversity: bool = False, train_hashes=None) -> dict:
    """Validity, uniqueness and novelty of sampled SMILES (the MOSES / GuacaMol definitions).

    validity: fraction of samples RDKit parses (non-empty); uniqueness: distinct canonical
    SMILES / valid; novelty: distinct valid molecules absent from the training set / distinct
    valid. Samples are compared as RDKit's canonical aromatic SMILES, so ``train_smiles`` must be
    canonical aromatic SMILES whatever form the model was trained on; ``train_hashes`` (a sorted
    uint64 array of ``smiles_pack.smiles_hash`` of those strings) stands for a training set too
    large to hold as strings. ``diversity=True`` adds the internal diversity 1 - mean pairwise Tanimoto
    similarity of Morgan fingerprints (radius 2, 2048 bits) over the distinct valid molecules.
    """
    samples = list(samples)
    if not samples:
        raise ValueError("generation_metrics needs at least one sample")
    valid = [c for c in (canonical(s, largest_fragment=False) if s else None for s in samples) if c]
    unique = set(valid)
    novel = unique - set(train_smiles)
    if train_hashes is not None and novel:
        from sciscale_jax.data.smiles_pack import smiles_hash

        candidates = sorted(novel)
        keys = np.array([smiles_hash(s) for s in candidates], np.uint64)
        at = np.minimum(np.searchsorted(train_hashes, keys), max(len(train_hashes) - 1, 0))
        seen = (np.asarray(train_hashes)[at] == keys) if len(train_hashes) else np.zeros(len(keys), bool)
        novel = {s for s, hit in zip(candidates, seen) if not hit}
    out = {"validity": len(valid) / len(samples),
           "uniqueness": len(unique) / len(valid) if valid else 0.0,
           "novelty": len(novel) / len(unique) if unique else 0.0}
    if diversity:
        out["internal_diversity"] = internal_diversity(sorted(unique))
    return out


def internal_diversity(smiles_list) -> float:
    """1 - mean Tanimoto similarity over distinct pairs of Morgan fingerprints (radius 2, 2048 bits)."""
    from rdkit import Chem, DataStructs
    from rdkit.Chem import rdFingerprintGenerator

    gen = rdFingerprintGenerator.GetMorganGenerator(radius=2, fpSize=2048)
    fps = [gen.GetFingerprint(Chem.MolFromSmiles(s)) for s in smiles_list]
    if len(fps) < 2:
        return 0.0
    total = sum(sum(DataStructs.BulkTanimotoSimilarity(fps[i], fps[i + 1:])) for i in range(len(fps) - 1))
    return 1.0 - total / (len(fps) * (len(fps) - 1) / 2)
