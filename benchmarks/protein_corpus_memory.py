"""Host memory and time of protein-mlm's data preparation on a large FASTA corpus (CPU).

Writes a FASTA file of ``--proteins`` proteins (the pyhmmer proteome, each copy with 10% of its
residues substituted, so no two are alike and the split varies), then runs ``build_data`` of
`sciscale train protein-mlm --data corpus.fasta` in a fresh process: first with an empty pack
cache (the corpus is packed), then again (the pack is opened from the cache), then once more
scoring every held-out protein (``--val-sequences`` above their number, as the version before
packing did; the default scores 10,000). Reports each one's peak resident set size
(``ru_maxrss``; the operating system's file cache is not counted), wall time and the time to
draw one training batch (mean of 200). ``--before PYTHON`` runs the same child with another
interpreter, whose environment has another version of sciscale_jax installed, e.g. the commit
before packing, which read the corpus into Python strings and int32 arrays. RSS, not XLA's
memory analysis: this is host-side work, no compiled step.

    git worktree add /tmp/before a06a617
    python -m venv /tmp/vb && /tmp/vb/bin/pip install -e "/tmp/before[science]"
    python benchmarks/protein_corpus_memory.py --proteins 3000000 --before /tmp/vb/bin/python \\
        --json benchmarks/results/protein_corpus_memory.json
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from host_memory import build_data_child, print_rows  # noqa: E402  (benchmarks/host_memory.py)



def write_corpus(path: pathlib.Path, proteins: int) -> tuple[int, int]:
    """The FASTA file (60 residues a line); returns (bytes, residues)."""
    import numpy as np

    from sciscale_jax.data import load_proteins

    source = load_proteins()
    rng = np.random.default_rng(0)
    letters = np.frombuffer(b"ACDEFGHIKLMNPQRSTVWY", np.uint8)
    residues = 0
    with open(path, "wb") as f:
        for i in range(proteins):
            seq = np.frombuffer(source[i % len(source)].encode(), np.uint8).copy()
            hit = rng.random(len(seq)) < 0.1
            seq[hit] = rng.choice(letters, int(hit.sum()))
            residues += len(seq)
            body = b"\n".join(seq[k:k + 60].tobytes() for k in range(0, len(seq), 60))
            f.write(b">protein_%d\n%s\n" % (i, body))
    return path.stat().st_size, residues


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--proteins", type=int, default=1_000_000)
    parser.add_argument("--before", help="a Python interpreter with another sciscale_jax installed, measured beside")
    parser.add_argument("--json", help="write the figures here")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = pathlib.Path(tmp)
        corpus = tmp / "corpus.fasta"
        size, residues = write_corpus(corpus, args.proteins)
        argv = ["protein-mlm", "--data", corpus]
        rows = {"pack (first run)": build_data_child(argv, tmp / "cache"),
                "cached (later runs)": build_data_child(argv, tmp / "cache"),
                # as the version before scores them: every held-out protein (the default scores 10,000)
                "cached, all held out": build_data_child([*argv, "--val-sequences", "100000000"], tmp / "cache")}
        if args.before:
            rows["before (in memory)"] = build_data_child(argv, tmp / "cache-before", python=args.before)
    result = {"proteins": args.proteins, "residues": residues, "fasta_bytes": size, "runs": rows}
    print(f"{args.proteins} proteins, {residues / 1e6:.0f}M residues, FASTA {size / 2**30:.2f} GiB")
    print_rows(rows)
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
